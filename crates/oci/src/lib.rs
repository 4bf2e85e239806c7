#![doc = include_str!("../README.md")]

pub mod api;
pub mod auth;
pub mod cache;
pub mod client;
pub mod error;
pub mod manifest;
mod pool;
pub mod proxy;
pub mod pull;
pub mod push;
pub mod reference;
mod sendfile;
pub mod server;
pub mod transport;

pub use client::{Client, Repo, Scope};
pub use error::{BoxError, Error, Result};
pub use proxy::ProxyConfig;
pub use reference::Reference;
pub use transport::{Direct, TlsOptions, Transport};

#![doc = include_str!("../README.md")]
//!
//! This library holds what the `stage0` binary needs that makes no system call: sha256,
//! argument parsing and message formatting, so that they are unit-tested with std's harness.
//! The binary (`src/main.rs`) adds the entry point, the system calls and the copy loop.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

pub mod args;
pub mod sha256;
pub mod text;

//! Integration tests of bundle-deploy below the line where a real API server is needed: the
//! Kubernetes logic of `deploy_with` and `remove` against an in-memory API server behind
//! kube's mock service (tower-test), pushing into a real in-process registry.

mod deploy;
mod fake_api;
mod fixtures;

//! Helpers for Portcullis end-to-end tests: real target servers, certificates, process control.

pub mod backend;
pub mod certs;
pub mod client;
pub mod grpc_peer;
pub mod management;
pub mod process;
pub mod proxy;

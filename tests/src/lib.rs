//! Helpers for Portcullis end-to-end tests: real target servers, certificates, process control.

pub mod auth_setup;
pub mod backend;
pub mod browser;
pub mod certs;
pub mod client;
pub mod crowdsec;
pub mod grpc_peer;
pub mod l4_client;
pub mod l4_targets;
pub mod management;
pub mod mesh_net;
pub mod netns;
pub mod oidc;
pub mod pebble;
pub mod process;
pub mod proxy;

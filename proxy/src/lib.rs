//! Portcullis: a reverse proxy that publishes services living inside a WireGuard mesh.
//!
//! The folder tree follows the planes: `control` (the thread that reloads configuration and
//! serves health), `dataplane` (monoio workers), `http` (HTTP/1.1 proxying), `tls`, `routes`.

pub mod acme;
pub mod agent;
pub mod auth;
pub mod cli;
pub mod config;
pub mod control;
pub mod crowdsec;
pub mod dataplane;
pub mod ebpf;
pub mod geo;
pub mod health;
pub mod http;
pub mod l4;
pub mod logging;
pub mod management_cli;
pub mod mappings_file;
pub mod mesh;
pub mod proxy_main;
pub mod routes;
pub mod state;
pub mod tls;
pub mod up;

//! The Portcullis management server: accounts, users and personal access tokens; proxy tokens;
//! clusters of proxies; services. Proxies connect over gRPC (`grpc`), people use REST (`rest`);
//! both share one store (`store`: SQLite by default, PostgreSQL for several replicas). Single
//! sign-on goes through each account's OpenID Connect provider (`oidc`).

pub mod bootstrap;
pub mod credentials;
pub mod events;
pub mod grpc;
pub mod model;
pub mod oidc;
pub mod rest;
pub mod secrets;
pub mod server;
pub mod store;

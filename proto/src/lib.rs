//! Generated types for the proxy ⇄ management protocol.
//!
//! This crate compiles `proto/proxy_service.proto` (package `management`,
//! service `ProxyService`) into prost messages plus a tonic client and server.
//! The protocol is wire-compatible with NetBird's proxy protocol, so a
//! Portcullis proxy can register with a NetBird management and a NetBird proxy
//! with a Portcullis management.
//!
//! Extensions of ours never change or reuse an existing field number: they use
//! field numbers ≥ 100 or live in a separate service.

/// Code generated from `proto/proxy_service.proto`.
#[allow(clippy::all, clippy::pedantic)]
pub mod management {
    tonic::include_proto!("management");
}

pub use management::*;

/// Code generated from `proto/portcullis_mesh.proto`: our WireGuard mesh extension (separate
/// services, so a NetBird management answers `UNIMPLEMENTED`).
#[allow(clippy::all, clippy::pedantic)]
pub mod mesh {
    tonic::include_proto!("portcullis.mesh.v1");
}

pub mod session;

/// Code generated from `proto/portcullis_logs.proto`: our batched access-log extension (a
/// separate service, so a NetBird management answers `UNIMPLEMENTED`).
pub use portcullis::logs::v1 as logs;

/// Nested like the protobuf package, because the generated code names NetBird's `AccessLog` by
/// its path relative to the package (`super::super::super::management`).
mod portcullis {
    pub mod logs {
        #[allow(clippy::all, clippy::pedantic)]
        pub mod v1 {
            tonic::include_proto!("portcullis.logs.v1");
        }
    }
}

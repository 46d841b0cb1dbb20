//! Compiles `proto/proxy_service.proto` and our extensions
//! `proto/portcullis_mesh.proto` and `proto/portcullis_logs.proto` into Rust
//! types, tonic clients and tonic servers. Uses the vendored `protoc` so no system protobuf install is
//! needed; the vendored binary also finds the well-known types
//! (`google/protobuf/*.proto`) on its own.

use std::error::Error;

const PROTOS: [&str; 3] = [
    "proto/proxy_service.proto",
    "proto/portcullis_mesh.proto",
    "proto/portcullis_logs.proto",
];

fn main() -> Result<(), Box<dyn Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    println!("cargo:rerun-if-changed=build.rs");

    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded at this point; nothing else
    // reads or writes the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };

    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&PROTOS, &["proto"])?;

    Ok(())
}

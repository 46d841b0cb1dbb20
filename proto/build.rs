//! Compiles `proto/proxy_service.proto` and our mesh extension
//! `proto/portcullis_mesh.proto` into Rust types, a tonic client and a
//! tonic server. Uses the vendored `protoc` so no system protobuf install is
//! needed; the vendored binary also finds the well-known types
//! (`google/protobuf/*.proto`) on its own.

use std::error::Error;

const PROTOS: [&str; 2] = ["proto/proxy_service.proto", "proto/portcullis_mesh.proto"];

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

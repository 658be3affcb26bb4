//! Compiles `sipwarden/v1/*.proto` with the pure-Rust `protox` compiler: no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "sipwarden/v1/types.proto",
        "sipwarden/v1/edge.proto",
        "sipwarden/v1/peer.proto",
        "sipwarden/v1/admin.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}

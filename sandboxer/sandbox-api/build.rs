//! Generates the gRPC server of containerd's sandbox controller service from
//! the schema in proto/ (protoc must be on PATH or in $PROTOC).
fn main() -> std::io::Result<()> {
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .compile_protos(&["proto/containerd/sandbox_controller.proto"], &["proto"])
}

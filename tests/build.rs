//! The CRI v1 client (k8s.io/cri-api's api.proto) as tonic code, generated
//! at build time with the system's protoc.
fn main() {
    println!("cargo:rerun-if-changed=proto/api.proto");
    tonic_prost_build::configure()
        .build_server(false)
        .build_transport(false)
        .compile_protos(&["proto/api.proto"], &["proto"])
        .expect("generating the CRI client from tests/proto/api.proto (is protoc installed?)");
}

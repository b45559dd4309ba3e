//! The agent API as prost code, generated at build time with the system's
//! protoc.
fn main() {
    println!("cargo:rerun-if-changed=proto/agent.proto");
    prost_build::compile_protos(&["proto/agent.proto"], &["proto"])
        .expect("generating the agent API from proto/agent.proto (is protoc installed?)");
}

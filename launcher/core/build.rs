//! Generates the control-plane gRPC code with protox, so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/rtrain.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        // Written by hand: the coordinator encodes a gang's peer list once for all its ranks.
        .extern_path(".rtrain.v1.RegisterReply", "crate::peer_list::RegisterReply")
        .compile_fds(descriptors)?;
    Ok(())
}

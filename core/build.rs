//! Compiles the control stream's protobuf (`proto/`) with protox, so the
//! build needs no `protoc`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let files = protox::compile(["lumen/control/v1/control.proto"], ["proto"])?;
    tonic_prost_build::configure()
        // Shared, not copied, by every stream that sends a view.
        .bytes(".lumen.control.v1.Snapshot.resources")
        .codec_path("crate::control::ControlCodec")
        .compile_fds(files)?;
    Ok(())
}

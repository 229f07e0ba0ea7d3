//! `sparkplug-proto-gen PROTO_DIR OUT_FILE`: compiles `PROTO_DIR/sparkplug_b.proto` with protox
//! and writes prost's Rust code for it to `OUT_FILE`.

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, dir, out] = &args[..] else {
        eprintln!("usage: sparkplug-proto-gen PROTO_DIR OUT_FILE");
        std::process::exit(2);
    };
    let fds = protox::compile(["sparkplug_b.proto"], [dir]).unwrap_or_else(|e| {
        eprintln!("{e:?}");
        std::process::exit(1);
    });
    let tmp = std::env::temp_dir().join(format!("sparkplug-proto-gen-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).expect("temp dir");
    prost_build::Config::new()
        .out_dir(&tmp)
        .compile_fds(fds)
        .expect("prost-build");
    let code = std::fs::read_to_string(tmp.join("org.eclipse.tahu.protobuf.rs")).expect("output");
    std::fs::write(out, code).expect("write output");
    let _ = std::fs::remove_dir_all(&tmp);
}

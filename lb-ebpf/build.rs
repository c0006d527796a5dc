use which::which;

/// Building this crate depends on the `bpf-linker` binary, which cargo cannot track: rebuild
/// when it changes (for example after `cargo xtask setup` reinstalled it).
fn main() {
    if let Ok(linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}

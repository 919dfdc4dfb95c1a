//! Run commands in a sandbox: a VM of an image that waits for commands, three of them, then
//! stopped.
//!
//! `cargo run --example sandbox -- [IMAGE]` (default `busybox`; any reference `supermachine
//! run` takes, e.g. `oci:./layout:latest`).

fn main() -> supermachine::Result<()> {
    let reference = std::env::args().nth(1).unwrap_or_else(|| "busybox".into());
    let image = supermachine::Image::open(&reference)?;
    let vm = image.start(&supermachine::VmConfig::new().memory_mib(128))?;

    // A command with its own environment; its output and status come back.
    let out = vm
        .exec_builder()
        .argv(["sh", "-c", "echo \"hello, $WHO\""])
        .env("WHO", "sandbox")
        .output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));

    // Files staged before the command, and input on its stdin.
    let out = vm
        .exec_builder()
        .argv(["sh", "-c", "cat /tmp/greeting; tr a-z A-Z"])
        .stage_file("/tmp/greeting", "staged file\n")
        .stdin("from stdin\n")
        .output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));

    // A command that runs too long is killed and reported.
    match vm
        .exec_builder()
        .argv(["sleep", "600"])
        .timeout(std::time::Duration::from_secs(1))
        .output()
    {
        Err(supermachine::Error::Timeout { after, .. }) => println!("timed out after {after:?}"),
        other => println!("unexpected: {other:?}"),
    }
    println!("exit status {}", vm.stop()?);
    Ok(())
}

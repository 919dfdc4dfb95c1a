//! Restore a server and connect to it: bake busybox httpd once it accepts connections, start
//! it from the snapshot, and fetch a page through a host port and through a direct stream.
//!
//! `cargo run --example server -- [IMAGE]` (default `busybox`).

use std::io::{Read, Write};

fn get(mut stream: impl Read + Write) -> std::io::Result<String> {
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response.split("\r\n\r\n").nth(1).unwrap_or("").to_string())
}

fn main() -> supermachine::Result<()> {
    let reference = std::env::args().nth(1).unwrap_or_else(|| "busybox".into());
    let server = supermachine::VmConfig::new().memory_mib(128).command([
        "sh",
        "-c",
        "mkdir -p /www && echo served from a snapshot > /www/index.html && exec httpd -f -p 80 -h /www",
    ]);
    let baked = supermachine::Image::open(&reference)?.bake(
        &supermachine::BakeOptions::new()
            .config(server.clone())
            .ready(supermachine::ReadyCheck::Port(80)),
    )?;
    let vm = baked.start(&server)?;
    let addr = vm.expose_tcp("127.0.0.1:0".parse().unwrap(), 80)?;
    print!(
        "through {addr}: {}",
        get(std::net::TcpStream::connect(addr)?)?
    );
    print!("through a stream: {}", get(vm.connect(80)?)?);
    vm.kill();
    Ok(())
}

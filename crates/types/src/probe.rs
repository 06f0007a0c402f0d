//! `notify-api healthcheck` / `notify-worker healthcheck`: container healthchecks in images
//! without curl. One HTTP/1.0 request to the binary's own `/ready` on loopback.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::ExitCode,
    time::Duration,
};

/// Exit 0 when `GET /ready` on 127.0.0.1:`port` answers 200 (port from the environment
/// variable `port_var`, else `default_port`), else 1.
pub fn healthcheck(port_var: &str, default_port: u16) -> ExitCode {
    let port = std::env::var(port_var).ok().and_then(|p| p.parse::<u16>().ok()).unwrap_or(default_port);
    match ready(port) {
        Ok(true) => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    }
}

fn ready(port: u16) -> std::io::Result<bool> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.write_all(b"GET /ready HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut buf = [0u8; 32];
    let n = s.read(&mut buf)?;
    Ok(buf[..n].starts_with(b"HTTP/1.1 200") || buf[..n].starts_with(b"HTTP/1.0 200"))
}

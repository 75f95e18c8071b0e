//! TCP request/response for the boundary benchmark (like netperf's TCP_RR
//! and TCP_CRR): `lh-rr server PORT` echoes one byte per request until EOF;
//! `lh-rr client ADDR PORT SECS persistent|connect` prints transactions
//! per second, over one connection or a new connection per transaction.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

fn serve(port: u16) -> std::io::Result<()> {
    let l = TcpListener::bind(("0.0.0.0", port))?;
    println!("ready");
    std::io::stdout().flush()?;
    for c in l.incoming() {
        let mut c = c?;
        std::thread::spawn(move || {
            let _ = c.set_nodelay(true);
            let mut b = [0u8; 1];
            while matches!(c.read(&mut b), Ok(1)) {
                if c.write_all(&b).is_err() {
                    break;
                }
            }
        });
    }
    Ok(())
}

fn one(c: &mut TcpStream) -> std::io::Result<()> {
    let mut b = [7u8; 1];
    c.write_all(&b)?;
    c.read_exact(&mut b)
}

fn client(addr: SocketAddr, secs: u64, persistent: bool) -> std::io::Result<f64> {
    let end = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let mut n = 0u64;
    if persistent {
        let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        c.set_nodelay(true)?;
        while Instant::now() < end {
            one(&mut c)?;
            n += 1;
        }
    } else {
        while Instant::now() < end {
            let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            c.set_nodelay(true)?;
            one(&mut c)?;
            n += 1;
        }
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let r = match a.get(1).map(String::as_str) {
        Some("server") if a.len() == 3 => serve(a[2].parse().expect("port")),
        Some("client") if a.len() == 6 => {
            let addr: SocketAddr = format!("{}:{}", a[2], a[3]).parse().expect("address");
            client(addr, a[4].parse().expect("seconds"), a[5] == "persistent").map(|tps| {
                println!("{tps:.0}");
            })
        }
        _ => {
            eprintln!("usage: lh-rr server PORT | lh-rr client ADDR PORT SECS persistent|connect");
            std::process::exit(2);
        }
    };
    if let Err(e) = r {
        eprintln!("lh-rr: {e}");
        std::process::exit(1);
    }
}

//! A hostile HTTP server for tests: it answers every request with an error whose body never
//! ends, and counts what it managed to send before the reader hung up.
#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub struct EndlessError {
    pub url: String,
    /// Body bytes written, over every connection.
    pub sent: Arc<AtomicU64>,
    /// Requests seen.
    pub requests: Arc<AtomicU64>,
}

/// Answers `500` with a chunked body that starts with `prefix` and then goes on with `x`
/// forever (until the reader closes the connection).
pub async fn endless_error(prefix: &str) -> EndlessError {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let sent = Arc::new(AtomicU64::new(0));
    let requests = Arc::new(AtomicU64::new(0));
    let (s2, r2, prefix) = (sent.clone(), requests.clone(), prefix.to_string());
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = l.accept().await {
            let (sent, requests, prefix) = (s2.clone(), r2.clone(), prefix.clone());
            tokio::spawn(async move {
                // The request's head (its body, if any, is never read).
                let mut buf = vec![0u8; 64 << 10];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                requests.fetch_add(1, Ordering::SeqCst);
                let head = "HTTP/1.1 500 Internal Server Error\r\ncontent-type: text/plain\r\n\
                            transfer-encoding: chunked\r\n\r\n";
                if sock.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let mut first = prefix.into_bytes();
                first.resize(64 << 10, b'x');
                let rest = vec![b'x'; 64 << 10];
                let mut chunk = first;
                loop {
                    let frame = format!("{:x}\r\n", chunk.len());
                    let ok = sock.write_all(frame.as_bytes()).await.is_ok()
                        && sock.write_all(&chunk).await.is_ok()
                        && sock.write_all(b"\r\n").await.is_ok();
                    if !ok {
                        return;
                    }
                    sent.fetch_add(chunk.len() as u64, Ordering::SeqCst);
                    chunk = rest.clone();
                }
            });
        }
    });
    EndlessError {
        url,
        sent,
        requests,
    }
}

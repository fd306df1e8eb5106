//! An HBONE peer under the test's control: any certificate, any CONNECT target,
//! any `Forwarded` claim. The demo and the refusal tests play forged or lying
//! peers with it.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result};
use http::{HeaderMap, HeaderValue};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;
use weft_api::Identity;
use weft_hbone::ca::IssuedCert;
use weft_hbone::client::{ConnectError, connect, handshake};
use weft_hbone::server::forwarded_header;
use weft_hbone::tls::{TrustRoots, client_config, server_name};

use crate::lab::LabPod;

/// What a CONNECT attempt came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// 200: the tunnel is open; carries what the far end sent back to `payload`.
    Open(Vec<u8>),
    /// The peer answered the CONNECT with this status.
    Refused(u16),
    /// TLS or HTTP/2 failed (the peer closed or alerted): the error text.
    Failed(String),
}

/// One CONNECT attempt.
#[derive(Clone, Debug)]
pub struct Attempt {
    /// Where to dial (a pod's `ip:15008`).
    pub server: SocketAddr,
    /// The identity the server must prove.
    pub expect: Identity,
    /// Our certificate.
    pub cert: IssuedCert,
    /// The roots we verify the server with.
    pub roots: TrustRoots,
    /// `:authority` of the CONNECT.
    pub target: SocketAddr,
    /// `Forwarded: for=` claim, if any.
    pub forwarded: Option<IpAddr>,
    /// Bytes to send once open (then half-close and read the reply).
    pub payload: Vec<u8>,
}

/// Runs `attempt` from inside `pod`.
pub fn attempt(pod: &LabPod, attempt: Attempt) -> Result<Outcome> {
    pod.netns.run(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(20), run(attempt)).await })
            .context("HBONE attempt timed out")?
    })
}

async fn run(a: Attempt) -> Result<Outcome> {
    let tcp = tokio::net::TcpStream::connect(a.server).await?;
    let tls = client_config(&a.cert, &a.roots, vec![a.expect.clone()])?;
    let tls = match TlsConnector::from(tls)
        .connect(server_name(a.server.ip()), tcp)
        .await
    {
        Ok(t) => t,
        Err(e) => return Ok(Outcome::Failed(format!("tls: {e}"))),
    };
    let (send, _closed) = match handshake(tls).await {
        Ok(s) => s,
        Err(e) => return Ok(Outcome::Failed(format!("h2: {e}"))),
    };
    let mut headers = HeaderMap::new();
    if let Some(ip) = a.forwarded {
        headers.insert("forwarded", HeaderValue::from_str(&forwarded_header(ip))?);
    }
    match connect(send, a.target, headers).await {
        Ok(mut stream) => {
            stream.write_all(&a.payload).await?;
            stream.shutdown().await?;
            let mut back = Vec::new();
            stream.read_to_end(&mut back).await?;
            Ok(Outcome::Open(back))
        }
        Err(ConnectError::Refused { status, .. }) => Ok(Outcome::Refused(status.as_u16())),
        Err(e) => Ok(Outcome::Failed(e.to_string())),
    }
}

//! Node-to-node calls over mutual TLS: length-prefixed JSON frames, one call at a time per
//! connection, a small pool of connections per peer, a deadline on every call.
//!
//! A frame is a 4-byte big-endian length and that many bytes of JSON. Frames above
//! `FRAME_BYTES_MAX` are refused by both sides; Raft is told the payload is too large and
//! sends fewer entries.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use medledger_core::tx::SignedTx;
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::consensus::{NodeInfo, TypeConfig};
use crate::records::service::{FetchAnswer, FetchRequest, WireError};
use crate::tls::{server_name, PeerCheck, PeerIdentity, TlsConfigs};

/// Largest frame either side sends or accepts.
pub const FRAME_BYTES_MAX: usize = 64 << 20;
/// Connections a node serves at once; more wait for a slot.
pub const CONNECTIONS_MAX: usize = 256;
/// Idle connections kept per peer.
const POOL_MAX: usize = 8;
/// How long a handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a served connection may sit idle between calls.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Serialize, Deserialize)]
#[allow(clippy::large_enum_variant)]
pub enum Request {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<u64>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// Transactions a follower admitted, for the leader to order.
    Forward {
        txs: Vec<SignedTx>,
        urgent: bool,
    },
    /// A node of a member organisation asks to join the voters.
    Join {
        node: NodeInfo,
    },
    /// Asks the leader to hand leadership to `to`.
    TransferLeader {
        to: u64,
    },
    /// From the leader handing over: start an election now (the target) or hold off
    /// elections for a while (everyone else).
    Handover {
        elect: bool,
        window_ms: u64,
    },
    /// The called node's Raft role, term, leader and applied position.
    Status,
    /// A member's node asks this custodian for record versions on behalf of one of its
    /// users; the custodian logs the access on the ledger before it answers.
    Fetch(FetchRequest),
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Response {
    AppendEntries(Result<AppendEntriesResponse<u64>, RaftError<u64>>),
    Vote(Result<VoteResponse<u64>, RaftError<u64>>),
    InstallSnapshot(Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>),
    /// Anything else: done, or why not.
    Done(Result<serde_json::Value, String>),
    /// A custodian's answer to `Fetch`.
    Fetched(Result<FetchAnswer, WireError>),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RpcError {
    #[error("peer {0} unreachable: {1}")]
    Unreachable(String, String),
    #[error("no answer from {0} within {1:?}")]
    Timeout(String, Duration),
    #[error("connection to {0} failed: {1}")]
    Network(String, String),
    #[error("frame of {0} bytes is over the limit")]
    TooLarge(usize),
}

/// Serves one call from an authenticated peer.
pub type Handler = Arc<
    dyn Fn(PeerIdentity, Request) -> Pin<Box<dyn Future<Output = Response> + Send>> + Send + Sync,
>;

async fn write_frame<W: AsyncWrite + Unpin>(stream: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    if bytes.len() > FRAME_BYTES_MAX {
        return Err(std::io::Error::other("frame over the limit"));
    }
    stream
        .write_all(&(bytes.len() as u32).to_be_bytes())
        .await?;
    stream.write_all(bytes).await?;
    stream.flush().await
}

async fn read_frame<R: AsyncRead + Unpin>(stream: &mut R) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > FRAME_BYTES_MAX {
        return Err(std::io::Error::other(format!(
            "frame of {len} bytes over the limit"
        )));
    }
    // The buffer grows with the bytes that arrive: a header claiming a large frame costs
    // its sender the bytes, not the receiver an allocation up front.
    let mut bytes = Vec::with_capacity(len.min(FRAME_PREALLOCATE_MAX));
    stream.take(len as u64).read_to_end(&mut bytes).await?;
    if bytes.len() < len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("frame cut short at {} of {len} bytes", bytes.len()),
        ));
    }
    Ok(bytes)
}

/// Most bytes reserved for a frame before its bytes arrive.
const FRAME_PREALLOCATE_MAX: usize = 64 << 10;

/// Accepts peers on `listener` until `shutdown` resolves. Each connection must complete a
/// mutual TLS handshake whose client certificate `check` accepts; each call is checked
/// again (a peer suspended since its handshake is refused from then on).
pub async fn serve(
    listener: TcpListener,
    tls: TlsConfigs,
    check: Arc<dyn PeerCheck>,
    handler: Handler,
    shutdown: impl Future<Output = ()> + Send,
) {
    let acceptor = TlsAcceptor::from(tls.server.clone());
    let slots = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((tcp, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let acceptor = acceptor.clone();
        let check = check.clone();
        let handler = handler.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let _ = tcp.set_nodelay(true);
            let Ok(Ok(mut stream)) =
                tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
            else {
                return;
            };
            let Some(chain) = stream.get_ref().1.peer_certificates().map(|c| c.to_vec()) else {
                return;
            };
            let Some((end_entity, intermediates)) = chain.split_first() else {
                return;
            };
            let intermediates: Vec<&[u8]> = intermediates.iter().map(|c| c.as_ref()).collect();
            loop {
                let Ok(Ok(frame)) =
                    tokio::time::timeout(IDLE_TIMEOUT, read_frame(&mut stream)).await
                else {
                    return;
                };
                let response = match check.check(end_entity.as_ref(), &intermediates) {
                    Err(reason) => Response::Done(Err(format!("peer refused: {reason}"))),
                    Ok(peer) => match serde_json::from_slice::<Request>(&frame) {
                        Err(e) => Response::Done(Err(format!("malformed request: {e}"))),
                        Ok(request) => handler(peer, request).await,
                    },
                };
                let Ok(bytes) = serde_json::to_vec(&response) else {
                    return;
                };
                if write_frame(&mut stream, &bytes).await.is_err() {
                    return;
                }
            }
        });
    }
}

type ClientStream = tokio_rustls::client::TlsStream<TcpStream>;

/// Calls to one peer node.
pub struct PeerClient {
    pub org: String,
    pub addr: String,
    connector: TlsConnector,
    idle: Mutex<Vec<ClientStream>>,
}

impl PeerClient {
    pub fn new(org: &str, addr: &str, tls: &TlsConfigs) -> PeerClient {
        PeerClient {
            org: org.to_string(),
            addr: addr.to_string(),
            connector: TlsConnector::from(tls.client.clone()),
            idle: Mutex::new(Vec::new()),
        }
    }

    async fn connect(&self) -> Result<ClientStream, RpcError> {
        let unreachable = |e: String| RpcError::Unreachable(self.addr.clone(), e);
        let tcp = TcpStream::connect(&self.addr)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let name = server_name(&self.org).map_err(unreachable)?;
        self.connector
            .connect(name, tcp)
            .await
            .map_err(|e| unreachable(format!("TLS: {e}")))
    }

    /// One call with a deadline; the connection goes back to the pool only if it worked.
    pub async fn call(&self, request: &Request, deadline: Duration) -> Result<Response, RpcError> {
        let bytes = serde_json::to_vec(request)
            .map_err(|e| RpcError::Network(self.addr.clone(), e.to_string()))?;
        if bytes.len() > FRAME_BYTES_MAX {
            return Err(RpcError::TooLarge(bytes.len()));
        }
        let work = async {
            let pooled = self.idle.lock().expect("pool lock").pop();
            let mut stream = match pooled {
                Some(stream) => stream,
                None => self.connect().await?,
            };
            let network = |e: std::io::Error| RpcError::Network(self.addr.clone(), e.to_string());
            write_frame(&mut stream, &bytes).await.map_err(network)?;
            let answer = read_frame(&mut stream).await.map_err(network)?;
            let response: Response = serde_json::from_slice(&answer)
                .map_err(|e| RpcError::Network(self.addr.clone(), e.to_string()))?;
            let mut idle = self.idle.lock().expect("pool lock");
            if idle.len() < POOL_MAX {
                idle.push(stream);
            }
            Ok(response)
        };
        match tokio::time::timeout(deadline, work).await {
            Ok(result) => result,
            Err(_) => Err(RpcError::Timeout(self.addr.clone(), deadline)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_frame_reads_whole_and_a_cut_short_one_is_an_error() {
        // Goal: a frame round-trips; a header claiming more bytes than follow (the largest
        // frame allowed, say) is an end-of-stream error, not a frame, and one over the limit
        // is refused from its header.
        let mut wire = Vec::new();
        write_frame(&mut wire, b"{\"ping\":1}")
            .await
            .expect("writes");
        assert_eq!(
            read_frame(&mut wire.as_slice()).await.expect("reads"),
            b"{\"ping\":1}"
        );

        let mut short = (FRAME_BYTES_MAX as u32).to_be_bytes().to_vec();
        short.extend_from_slice(b"only this");
        let error = read_frame(&mut short.as_slice())
            .await
            .expect_err("cut short");
        assert_eq!(error.kind(), std::io::ErrorKind::UnexpectedEof);

        let over = ((FRAME_BYTES_MAX + 1) as u32).to_be_bytes();
        let error = read_frame(&mut over.as_slice()).await.expect_err("over");
        assert!(error.to_string().contains("over the limit"), "{error}");
    }
}

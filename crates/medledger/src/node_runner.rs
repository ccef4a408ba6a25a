//! Starting a node: opening its store, loading its identity, serving its API.

use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use medledger_node::consortium::Identity;
use medledger_node::ledger::{Ledger, NodeIdentity, OrderingConfig};
use tokio::sync::oneshot;

/// The node's identity file inside its data directory.
pub const NODE_IDENTITY_FILE: &str = "node.identity.json";

/// A node serving in a background thread; stopped when dropped.
pub struct RunningNode {
    pub url: String,
    pub ledger: Arc<Ledger>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

pub fn load_node_identity(data_dir: &Path) -> Result<NodeIdentity, String> {
    let identity = Identity::load(&data_dir.join(NODE_IDENTITY_FILE)).map_err(|e| e.to_string())?;
    NodeIdentity::from_member(&identity).map_err(|e| e.to_string())
}

/// Opens the node in `data_dir` and serves its API on `listen` (port 0 picks a free one).
pub fn start(data_dir: &Path, listen: &str, config: OrderingConfig) -> Result<RunningNode, String> {
    let identity = load_node_identity(data_dir)?;
    let ledger =
        Arc::new(Ledger::open_solo(data_dir, identity, config).map_err(|e| e.to_string())?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("medledger-api")
        .build()
        .map_err(|e| e.to_string())?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(listen))
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let address = listener.local_addr().map_err(|e| e.to_string())?;
    let (shutdown, stop) = oneshot::channel::<()>();
    let served = ledger.clone();
    let thread = std::thread::Builder::new()
        .name("medledger-node".into())
        .spawn(move || {
            let result = runtime.block_on(medledger_node::api::serve(served, listener, async {
                let _ = stop.await;
            }));
            if let Err(error) = result {
                eprintln!("medledger: the API server stopped: {error}");
            }
        })
        .map_err(|e| e.to_string())?;
    Ok(RunningNode {
        url: format!("http://{address}"),
        ledger,
        shutdown: Some(shutdown),
        thread: Some(thread),
    })
}

impl Drop for RunningNode {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

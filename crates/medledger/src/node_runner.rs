//! Starting a node: opening its store, loading its identity, joining its consortium,
//! serving its API.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use medledger_node::cluster::ClusterNode;
use medledger_node::config::NodeConfig;
use medledger_node::consensus::NodeInfo;
use medledger_node::consortium::Identity;
use medledger_node::keywrap::EncryptionKeyPair;
use medledger_node::ledger::{Ledger, NodeIdentity, OrderingConfig};
use medledger_node::records::{EmbeddedStore, PostgresStore, RecordService, RecordStore};
use medledger_node::store::Store;
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

/// A node's identity and its organisation's encryption key pairs, from its identity file.
fn load_identity(path: &Path) -> Result<(NodeIdentity, Vec<EncryptionKeyPair>), String> {
    let identity = Identity::load(path).map_err(|e| e.to_string())?;
    let node = NodeIdentity::from_member(&identity).map_err(|e| e.to_string())?;
    Ok((node, identity.encryption_keys))
}

/// The record store a node is configured with: PostgreSQL when a connection string is
/// given, else the embedded store in its data directory.
pub fn open_record_store(
    data_dir: &Path,
    connection: Option<&str>,
) -> Result<Arc<dyn RecordStore>, String> {
    Ok(match connection {
        Some(connection) => {
            Arc::new(PostgresStore::connect(connection).map_err(|e| e.to_string())?)
        }
        None => Arc::new(EmbeddedStore::open(data_dir).map_err(|e| e.to_string())?),
    })
}

/// The node's record service, publishing the organisation's encryption key in the
/// background until the ledger has it (a new consortium may not have a leader yet).
fn record_service(
    ledger: Arc<Ledger>,
    store: Arc<dyn RecordStore>,
    keys: Vec<EncryptionKeyPair>,
    link: Option<Arc<dyn medledger_node::records::service::CustodianLink>>,
) -> Option<Arc<RecordService>> {
    match RecordService::new(ledger, store, keys, link) {
        Ok(service) => {
            let service = Arc::new(service);
            let publisher = Arc::downgrade(&service);
            tokio::spawn(async move {
                let mut attempts = 0u32;
                while let Some(service) = publisher.upgrade() {
                    match service.publish_key().await {
                        Ok(_) => return,
                        Err(error) => {
                            attempts += 1;
                            if attempts % 20 == 0 {
                                eprintln!("medledger: publishing the encryption key: {error}");
                            }
                        }
                    }
                    drop(service);
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            });
            Some(service)
        }
        Err(error) => {
            eprintln!("medledger: this node keeps no records: {error}");
            None
        }
    }
}

/// Opens the node in `data_dir` and serves its API on `listen` (port 0 picks a free one).
pub fn start(data_dir: &Path, listen: &str, config: OrderingConfig) -> Result<RunningNode, String> {
    let (identity, keys) = load_identity(&data_dir.join(NODE_IDENTITY_FILE))?;
    let ledger =
        Arc::new(Ledger::open_solo(data_dir, identity, config).map_err(|e| e.to_string())?);
    let record_store = open_record_store(data_dir, None)?;
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
    let served_records = {
        let _entered = runtime.enter();
        record_service(ledger.clone(), record_store, keys, None)
    };
    let router = medledger_node::fhir_api::node_api(
        served,
        served_records,
        data_dir,
        &format!("http://{address}"),
    )?;
    let thread = std::thread::Builder::new()
        .name("medledger-node".into())
        .spawn(move || {
            let result =
                runtime.block_on(medledger_node::api::serve_router(router, listener, async {
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

/// A consortium member's node (Raft over mutual TLS) running in a background thread with its
/// own runtime; stopped when dropped.
pub struct RunningMember {
    pub api_url: String,
    pub peer_addr: String,
    pub ledger: Arc<Ledger>,
    pub node: Arc<ClusterNode>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// Starts the node a configuration describes: founders start the Raft group with the other
/// founders, other nodes ask their peers to be let in (and keep asking until they are).
pub fn start_member(config: &NodeConfig) -> Result<RunningMember, String> {
    let (identity, keys) = load_identity(&config.identity)?;
    let store = Arc::new(Store::open(&config.data_dir).map_err(|e| e.to_string())?);
    let record_store = open_record_store(&config.data_dir, config.record_store.as_deref())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("medledger-member")
        .build()
        .map_err(|e| e.to_string())?;
    let config = config.clone();
    let (ready, started) = std::sync::mpsc::channel();
    let (shutdown, stop) = oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("medledger-member".into())
        .spawn(move || {
            runtime.block_on(async move {
                let api = match tokio::net::TcpListener::bind(&config.api_listen).await {
                    Ok(listener) => listener,
                    Err(e) => {
                        let _ =
                            ready.send(Err(format!("cannot listen on {}: {e}", config.api_listen)));
                        return;
                    }
                };
                let peer = match tokio::net::TcpListener::bind(&config.peer_listen).await {
                    Ok(listener) => listener,
                    Err(e) => {
                        let _ = ready
                            .send(Err(format!("cannot listen on {}: {e}", config.peer_listen)));
                        return;
                    }
                };
                let api_addr = api.local_addr().map(|a| a.to_string()).unwrap_or_default();
                let peer_addr = peer.local_addr().map(|a| a.to_string()).unwrap_or_default();
                let info = NodeInfo {
                    node: identity.id.clone(),
                    peer_addr: config.peer_advertise.clone().unwrap_or(peer_addr.clone()),
                    api_url: config
                        .api_advertise
                        .clone()
                        .unwrap_or(format!("http://{api_addr}")),
                };
                let node = match ClusterNode::start(
                    store,
                    identity,
                    info.clone(),
                    peer,
                    config.settings(),
                )
                .await
                {
                    Ok(node) => Arc::new(node),
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                };
                if config.founder {
                    let mut founders: BTreeMap<u64, NodeInfo> = config
                        .peers
                        .iter()
                        .map(|peer| (node_id_of(peer), peer.clone()))
                        .collect();
                    founders.insert(node.id, info.clone());
                    if let Err(e) = node.bootstrap(founders).await {
                        let _ = ready.send(Err(e));
                        return;
                    }
                } else {
                    let joining = node.clone();
                    let seeds = config.peers.clone();
                    tokio::spawn(async move {
                        loop {
                            match joining.join(&seeds, Duration::from_secs(30)).await {
                                Ok(()) => return,
                                Err(e) => {
                                    eprintln!("medledger: joining the consortium: {e}; retrying")
                                }
                            }
                        }
                    });
                }
                let ledger = node.ledger.clone();
                let records = record_service(
                    ledger.clone(),
                    record_store,
                    keys,
                    Some(node.custodian_link()),
                );
                if let Some(records) = &records {
                    node.attach_records(records);
                }
                let router = match medledger_node::fhir_api::node_api(
                    ledger,
                    records,
                    &config.data_dir,
                    &info.api_url,
                ) {
                    Ok(router) => router,
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        node.shutdown().await;
                        return;
                    }
                };
                let _ = ready.send(Ok((info, node.clone())));
                let served = medledger_node::api::serve_router(router, api, async {
                    let _ = stop.await;
                })
                .await;
                if let Err(error) = served {
                    eprintln!("medledger: the API server stopped: {error}");
                }
                node.shutdown().await;
            });
        })
        .map_err(|e| e.to_string())?;
    let (info, node) = started
        .recv()
        .map_err(|_| "the node thread ended while starting".to_string())??;
    Ok(RunningMember {
        api_url: info.api_url,
        peer_addr: info.peer_addr,
        ledger: node.ledger.clone(),
        node,
        shutdown: Some(shutdown),
        thread: Some(thread),
    })
}

fn node_id_of(peer: &NodeInfo) -> u64 {
    let org = medledger_core::identity::split_user_id(&peer.node)
        .map(|(org, _)| org)
        .unwrap_or(&peer.node);
    medledger_node::consensus::raft_id(org)
}

impl Drop for RunningMember {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

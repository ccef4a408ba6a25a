//! A ready-to-run consortium on loopback: keys, genesis, and one configured node directory
//! per member (`medledger consortium local`, the demo and the benchmarks use it).

use std::path::{Path, PathBuf};

use medledger_core::identity::OrgKind;
use medledger_node::config::{NodeConfig, NODE_CONFIG_FILE};
use medledger_node::consensus::NodeInfo;
use medledger_node::consortium::Consortium;
use medledger_node::ledger::{initialise, now_ms};

use crate::commands::{validity_days, write_consortium, ConsortiumLayout};
use crate::node_runner::NODE_IDENTITY_FILE;

/// Members of a generated consortium, in order; the first `nodes` of them run nodes.
pub const LOCAL_ORGS: [(&str, OrgKind); 5] = [
    ("hospital-a", OrgKind::Hospital),
    ("hospital-b", OrgKind::Hospital),
    ("lab-x", OrgKind::Lab),
    ("clinic-c", OrgKind::Clinic),
    ("regulator", OrgKind::Regulator),
];

pub struct LocalConsortium {
    pub consortium: Consortium,
    pub keys: ConsortiumLayout,
    /// One configuration file per node, in member order.
    pub configs: Vec<PathBuf>,
}

/// The API and peer addresses of the `index`th node.
pub fn addresses(base_port: u16, index: usize) -> (String, String) {
    (
        format!("127.0.0.1:{}", base_port as usize + index),
        format!("127.0.0.1:{}", base_port as usize + 100 + index),
    )
}

/// Writes the consortium of `orgs` into `dir/keys` and a node directory for each of the first
/// `nodes` members into `dir/nodes/<org>`: identity, genesis, `node.toml`. Node `i` serves its
/// API on `base_port + i` and its peers on `base_port + 100 + i`.
pub fn create_local(
    dir: &Path,
    chain_id: &str,
    orgs: &[(&str, OrgKind)],
    nodes: usize,
    base_port: u16,
    tune: impl Fn(&mut NodeConfig),
) -> Result<LocalConsortium, String> {
    if nodes == 0 || nodes > orgs.len() {
        return Err(format!("between 1 and {} nodes, not {nodes}", orgs.len()));
    }
    let consortium = Consortium::create(chain_id, orgs, now_ms(), validity_days(365))
        .map_err(|e| e.to_string())?;
    let keys = ConsortiumLayout(dir.join("keys"));
    write_consortium(&keys, &consortium)?;
    let infos: Vec<NodeInfo> = (0..nodes)
        .map(|index| {
            let (api, peer) = addresses(base_port, index);
            NodeInfo {
                node: format!("node@{}", orgs[index].0),
                peer_addr: peer,
                api_url: format!("http://{api}"),
            }
        })
        .collect();
    let mut configs = Vec::new();
    for (index, (org, _)) in orgs.iter().take(nodes).enumerate() {
        let node_dir = dir.join("nodes").join(org);
        let member = consortium.org(org).expect("a founding member");
        member
            .node
            .save(&node_dir.join(NODE_IDENTITY_FILE))
            .map_err(|e| e.to_string())?;
        initialise(&node_dir, &consortium.genesis).map_err(|e| e.to_string())?;
        let (api, peer) = addresses(base_port, index);
        let mut config = NodeConfig {
            identity: NODE_IDENTITY_FILE.into(),
            data_dir: ".".into(),
            api_listen: api,
            peer_listen: peer,
            peer_advertise: None,
            api_advertise: None,
            founder: true,
            consensus: Default::default(),
            ordering: Default::default(),
            peers: infos
                .iter()
                .enumerate()
                .filter(|(other, _)| *other != index)
                .map(|(_, info)| info.clone())
                .collect(),
            record_store: None,
        };
        tune(&mut config);
        let path = node_dir.join(NODE_CONFIG_FILE);
        std::fs::write(&path, config.to_toml()).map_err(|e| format!("{}: {e}", path.display()))?;
        configs.push(path);
    }
    Ok(LocalConsortium {
        consortium,
        keys,
        configs,
    })
}

/// A base port whose API and peer ports for `nodes` nodes are free on loopback right now.
pub fn free_base_port(nodes: usize) -> Result<u16, String> {
    let start = 20_000 + (std::process::id() as usize * 7919) % 30_000;
    for attempt in 0..200 {
        let base = 20_000 + (start + attempt * 211) % 40_000;
        let free = (0..nodes).all(|index| {
            let (api, peer) = addresses(base as u16, index);
            std::net::TcpListener::bind(&api).is_ok() && std::net::TcpListener::bind(&peer).is_ok()
        });
        if free {
            return Ok(base as u16);
        }
    }
    Err("no free ports on loopback".into())
}

/// Starts every node of a generated consortium and waits until they have a leader.
pub fn start_all(configs: &[PathBuf]) -> Result<Vec<crate::node_runner::RunningMember>, String> {
    let mut nodes = Vec::new();
    for path in configs {
        let config = NodeConfig::load(path).map_err(|e| e.to_string())?;
        nodes.push(crate::node_runner::start_member(&config)?);
    }
    let started = std::time::Instant::now();
    while started.elapsed() < std::time::Duration::from_secs(20) {
        if nodes.iter().all(|node| node.node.status().leader.is_some()) {
            return Ok(nodes);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Err("the nodes elected no leader within 20 s".into())
}

/// Waits until every node has applied the same head; returns it.
pub fn wait_for_agreement(
    nodes: &[crate::node_runner::RunningMember],
    within: std::time::Duration,
) -> Result<medledger_core::block::ChainHead, String> {
    let started = std::time::Instant::now();
    loop {
        let heads = nodes
            .iter()
            .map(|node| {
                node.ledger
                    .store()
                    .head()
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| "a node without genesis".to_string())
            })
            .collect::<Result<Vec<_>, String>>()?;
        if heads.windows(2).all(|pair| pair[0] == pair[1]) {
            return Ok(heads[0].clone());
        }
        if started.elapsed() > within {
            return Err(format!(
                "the nodes do not agree after {within:?}: {heads:?}"
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

//! A member node's configuration: one TOML file beside its key material.
//!
//! ```toml
//! identity = "node.identity.json"   # paths are relative to this file
//! data_dir = "."
//! api_listen = "127.0.0.1:7400"
//! peer_listen = "127.0.0.1:7500"
//! founder = true                    # founders start the Raft group; others ask to join
//! # record_store = "host=db.internal user=medledger dbname=records"  # PostgreSQL; default: embedded
//!
//! [consensus]
//! heartbeat_ms = 100
//!
//! [ordering]
//! batch_delay_ms = 0
//!
//! [[peers]]                         # founders: the founding nodes; others: whom to ask
//! node = "node@hospital-b"
//! peer_addr = "127.0.0.1:7501"
//! api_url = "http://127.0.0.1:7401"
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cluster::ClusterSettings;
use crate::consensus::NodeInfo;
use crate::ledger::OrderingConfig;

/// The configuration file's name inside a node directory.
pub const NODE_CONFIG_FILE: &str = "node.toml";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// The node's identity file (key, node certificate, organisation CA).
    pub identity: PathBuf,
    /// Where the node's store lives.
    pub data_dir: PathBuf,
    /// Address of the client API.
    pub api_listen: String,
    /// Address of the node-to-node (mutual TLS) listener.
    pub peer_listen: String,
    /// How peers and clients reach this node, if not at the listen addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_advertise: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_advertise: Option<String>,
    /// A founding member's node starts the Raft group with the other founders (`peers`);
    /// any other node asks `peers` to be let in once its organisation is admitted.
    pub founder: bool,
    #[serde(default)]
    pub consensus: ConsensusConfig,
    #[serde(default)]
    pub ordering: OrderingSection,
    #[serde(default)]
    pub peers: Vec<NodeInfo>,
    /// Where the organisation's encrypted records live: a PostgreSQL connection string
    /// (keep passwords out of it: use a password file or peer authentication), or absent
    /// for the embedded store (`records.redb` in `data_dir`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record_store: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsensusConfig {
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    pub proposals_in_flight_max: usize,
    pub rpc_timeout_ms: u64,
    pub snapshot_every_entries: u64,
}

impl Default for ConsensusConfig {
    fn default() -> Self {
        let settings = ClusterSettings::default();
        ConsensusConfig {
            heartbeat_ms: settings.heartbeat_ms,
            election_timeout_min_ms: settings.election_timeout_min_ms,
            election_timeout_max_ms: settings.election_timeout_max_ms,
            proposals_in_flight_max: settings.proposals_in_flight_max,
            rpc_timeout_ms: settings.rpc_timeout_ms,
            snapshot_every_entries: settings.snapshot_every_entries,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OrderingSection {
    pub batch_txs_max: usize,
    pub batch_delay_ms: u64,
    pub queue_txs_max: usize,
    pub commit_timeout_ms: u64,
}

impl Default for OrderingSection {
    fn default() -> Self {
        let ordering = OrderingConfig::default();
        OrderingSection {
            batch_txs_max: ordering.batch_txs_max,
            batch_delay_ms: ordering.batch_delay_ms,
            queue_txs_max: ordering.queue_txs_max,
            commit_timeout_ms: ordering.commit_timeout_ms,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {detail}")]
    File { path: String, detail: String },
    #[error("{0}")]
    Invalid(String),
}

impl NodeConfig {
    /// Reads a configuration; relative paths in it are taken from the file's directory.
    pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
        let error = |detail: String| ConfigError::File {
            path: path.display().to_string(),
            detail,
        };
        let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
        let mut config: NodeConfig = toml::from_str(&text).map_err(|e| error(e.to_string()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.identity = base.join(&config.identity);
        config.data_dir = base.join(&config.data_dir);
        config.check()?;
        Ok(config)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("configurations encode")
    }

    fn check(&self) -> Result<(), ConfigError> {
        let c = &self.consensus;
        if c.heartbeat_ms == 0 || c.election_timeout_min_ms <= c.heartbeat_ms {
            return Err(ConfigError::Invalid(
                "consensus: election_timeout_min_ms must exceed heartbeat_ms > 0".into(),
            ));
        }
        if c.election_timeout_max_ms <= c.election_timeout_min_ms {
            return Err(ConfigError::Invalid(
                "consensus: election_timeout_max_ms must exceed election_timeout_min_ms".into(),
            ));
        }
        let o = &self.ordering;
        if o.batch_txs_max == 0 || o.batch_txs_max > medledger_core::block::BLOCK_TXS_MAX {
            return Err(ConfigError::Invalid(format!(
                "ordering: batch_txs_max must be 1..={}",
                medledger_core::block::BLOCK_TXS_MAX
            )));
        }
        if o.queue_txs_max == 0 {
            return Err(ConfigError::Invalid(
                "ordering: queue_txs_max must be > 0".into(),
            ));
        }
        Ok(())
    }

    pub fn settings(&self) -> ClusterSettings {
        let c = &self.consensus;
        let o = &self.ordering;
        ClusterSettings {
            ordering: OrderingConfig {
                batch_txs_max: o.batch_txs_max,
                batch_delay_ms: o.batch_delay_ms,
                queue_txs_max: o.queue_txs_max,
                commit_timeout_ms: o.commit_timeout_ms,
            },
            heartbeat_ms: c.heartbeat_ms,
            election_timeout_min_ms: c.election_timeout_min_ms,
            election_timeout_max_ms: c.election_timeout_max_ms,
            proposals_in_flight_max: c.proposals_in_flight_max,
            rpc_timeout_ms: c.rpc_timeout_ms,
            snapshot_every_entries: c.snapshot_every_entries,
            offload_io: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_configuration_reads_back_and_bad_timing_is_refused() {
        // Proves the TOML round trip the CLI relies on, relative paths, and that timing
        // that cannot elect a leader is refused at load rather than at the first election.
        let dir = tempfile::tempdir().unwrap();
        let config = NodeConfig {
            identity: "node.identity.json".into(),
            data_dir: ".".into(),
            api_listen: "127.0.0.1:7400".into(),
            peer_listen: "127.0.0.1:7500".into(),
            peer_advertise: None,
            api_advertise: None,
            founder: true,
            consensus: ConsensusConfig::default(),
            ordering: OrderingSection::default(),
            peers: vec![NodeInfo {
                node: "node@hospital-b".into(),
                peer_addr: "127.0.0.1:7501".into(),
                api_url: "http://127.0.0.1:7401".into(),
            }],
            record_store: Some("host=/run/postgresql dbname=records".into()),
        };
        let path = dir.path().join(NODE_CONFIG_FILE);
        std::fs::write(&path, config.to_toml()).unwrap();
        let loaded = NodeConfig::load(&path).unwrap();
        assert_eq!(loaded.identity, dir.path().join("node.identity.json"));
        assert_eq!(loaded.peers, config.peers);
        assert_eq!(loaded.settings().heartbeat_ms, 100);

        let mut bad = config.clone();
        bad.consensus.election_timeout_max_ms = bad.consensus.election_timeout_min_ms;
        std::fs::write(&path, bad.to_toml()).unwrap();
        assert!(matches!(
            NodeConfig::load(&path),
            Err(ConfigError::Invalid(_))
        ));
        std::fs::write(&path, "founder = \"maybe\"").unwrap();
        assert!(matches!(
            NodeConfig::load(&path),
            Err(ConfigError::File { .. })
        ));
    }
}

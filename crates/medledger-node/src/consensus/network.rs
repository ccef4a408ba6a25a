//! Raft's messages over the node-to-node RPC (mutual TLS).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError, Timeout,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::RPCTypes;

use super::{NodeInfo, TypeConfig};
use crate::rpc::{PeerClient, Request, Response, RpcError};
use crate::tls::TlsConfigs;

/// Clients of the peers, by Raft id; replaced when a peer's address changes.
#[derive(Clone)]
pub struct Peers {
    tls: TlsConfigs,
    clients: Arc<Mutex<HashMap<u64, Arc<PeerClient>>>>,
}

impl Peers {
    pub fn new(tls: TlsConfigs) -> Peers {
        Peers {
            tls,
            clients: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The client for node `id` at `node`'s address.
    pub fn client(&self, id: u64, node: &NodeInfo) -> Arc<PeerClient> {
        let org = medledger_core::identity::split_user_id(&node.node)
            .map(|(org, _)| org.to_string())
            .unwrap_or_default();
        let mut clients = self.clients.lock().expect("peers lock");
        match clients.get(&id) {
            Some(client) if client.addr == node.peer_addr && client.org == org => client.clone(),
            _ => {
                let client = Arc::new(PeerClient::new(&org, &node.peer_addr, &self.tls));
                clients.insert(id, client.clone());
                client
            }
        }
    }
}

pub struct PeerNetwork {
    source: u64,
    target: u64,
    client: Arc<PeerClient>,
}

impl RaftNetworkFactory<TypeConfig> for Peers {
    type Network = PeerNetwork;

    async fn new_client(&mut self, target: u64, node: &NodeInfo) -> PeerNetwork {
        PeerNetwork {
            source: 0,
            target,
            client: self.client(target, node),
        }
    }
}

impl PeerNetwork {
    fn failure<E: std::error::Error>(
        &self,
        action: RPCTypes,
        option: &RPCOption,
        error: RpcError,
    ) -> RPCError<u64, NodeInfo, E> {
        match error {
            RpcError::Unreachable(..) => RPCError::Unreachable(Unreachable::new(&error)),
            RpcError::Timeout(..) => RPCError::Timeout(Timeout {
                action,
                id: self.source,
                target: self.target,
                timeout: option.hard_ttl(),
            }),
            RpcError::TooLarge(_) => {
                RPCError::PayloadTooLarge(PayloadTooLarge::new_entries_hint(1))
            }
            RpcError::Network(..) => RPCError::Network(NetworkError::new(&error)),
        }
    }

    fn unexpected<E: std::error::Error>(&self, response: Response) -> RPCError<u64, NodeInfo, E> {
        let detail = match response {
            Response::Done(Err(reason)) => reason,
            other => format!("unexpected answer {other:?}"),
        };
        RPCError::Network(NetworkError::new(&RpcError::Network(
            self.client.addr.clone(),
            detail,
        )))
    }
}

impl RaftNetwork<TypeConfig> for PeerNetwork {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, NodeInfo, RaftError<u64>>> {
        let entries = rpc.entries.len() as u64;
        let request = Request::AppendEntries(rpc);
        match self.client.call(&request, option.hard_ttl()).await {
            Ok(Response::AppendEntries(Ok(response))) => Ok(response),
            Ok(Response::AppendEntries(Err(error))) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, error)))
            }
            Ok(other) => Err(self.unexpected(other)),
            Err(RpcError::TooLarge(_)) if entries > 1 => Err(RPCError::PayloadTooLarge(
                PayloadTooLarge::new_entries_hint(entries / 2),
            )),
            Err(error) => Err(self.failure(RPCTypes::AppendEntries, &option, error)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, NodeInfo, RaftError<u64, InstallSnapshotError>>,
    > {
        let request = Request::InstallSnapshot(rpc);
        match self.client.call(&request, option.hard_ttl()).await {
            Ok(Response::InstallSnapshot(Ok(response))) => Ok(response),
            Ok(Response::InstallSnapshot(Err(error))) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, error)))
            }
            Ok(other) => Err(self.unexpected(other)),
            Err(error) => Err(self.failure(RPCTypes::InstallSnapshot, &option, error)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, NodeInfo, RaftError<u64>>> {
        let request = Request::Vote(rpc);
        match self.client.call(&request, option.hard_ttl()).await {
            Ok(Response::Vote(Ok(response))) => Ok(response),
            Ok(Response::Vote(Err(error))) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, error)))
            }
            Ok(other) => Err(self.unexpected(other)),
            Err(error) => Err(self.failure(RPCTypes::Vote, &option, error)),
        }
    }
}

//! The medledger node: the shell around the pure core. It owns the clock, the keys, the
//! embedded store, the ordering of transactions into blocks and the HTTP API.

pub mod api;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod consensus;
pub mod consortium;
pub mod fhir;
pub mod fhir_api;
pub mod fhir_search;
pub mod keywrap;
pub mod ledger;
pub mod pki;
pub mod records;
pub mod refresh;
pub mod rpc;
pub mod sealing;
pub mod store;
pub mod tls;
pub mod verify;
pub mod work;

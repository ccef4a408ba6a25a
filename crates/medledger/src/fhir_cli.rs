//! Accounts for the FHIR API (`account add|add-client|add-app|remove|remove-app`) and
//! getting a token (`token`): what an administrator and a command-line user need around
//! `/fhir`.

use std::path::{Path, PathBuf};

use clap::Subcommand;
use medledger_node::auth::{
    base32_decode, base32_encode, otpauth_uri, totp_code, AccountKind, AccountStore, App, Client,
};
use medledger_node::consortium::Identity;
use medledger_node::fhir_api::ACCOUNTS_FILE;

#[derive(Subcommand)]
pub enum AccountCommand {
    /// Give a person a login at a node: password plus a one-time code (TOTP). Prints the
    /// code's secret once, as text and as an otpauth:// URI for an authenticator app.
    Add {
        /// The node's data directory (its accounts file lives there).
        #[arg(long)]
        data_dir: PathBuf,
        /// The person's key file: a member user's or a patient's identity file. The node
        /// signs their ledger transactions with it.
        #[arg(long)]
        identity: PathBuf,
        /// The most a login may be granted, as SMART scopes.
        #[arg(long)]
        scopes: Option<String>,
        /// A file holding the password (first line); otherwise MEDLEDGER_PASSWORD.
        #[arg(long)]
        password_file: Option<PathBuf>,
    },
    /// Enrol a system (SMART Backend Services): its public keys as a JWK set, and the member
    /// user it acts as (who needs an account at this node: the client signs with their key).
    AddClient {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        client_id: String,
        /// A JSON file `{"keys": [...]}` with the client's public keys.
        #[arg(long)]
        jwks: PathBuf,
        /// The user the client acts as, `name@org`.
        #[arg(long)]
        acts_as: String,
        #[arg(long, default_value = "system/*.rs")]
        scopes: String,
    },
    /// Register a SMART app for the standalone launch: a public client (browser or native)
    /// that sends people to `/auth/authorize` to log in and exchanges the code it gets back,
    /// with its PKCE verifier, at `/auth/token`.
    AddApp {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        client_id: String,
        /// Where the app receives its code, matched exactly: https, or http only on
        /// 127.0.0.1, localhost or [::1]. Repeat for several.
        #[arg(long = "redirect-uri", required = true)]
        redirect_uris: Vec<String>,
        /// The most a token for this app may carry (patient/ and user/ scopes); a login
        /// gets what the app asks for, within this and the account's own allowance.
        #[arg(long)]
        scopes: String,
    },
    /// Remove a person's login.
    Remove {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        username: String,
    },
    /// Remove a registered SMART app; codes it holds can no longer be exchanged.
    RemoveApp {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        client_id: String,
    },
}

/// Scopes a person gets at most when none are named: a patient their own records and
/// consents; a member user every record type (their role and the consents still decide).
fn default_scopes(kind: AccountKind) -> &'static str {
    match kind {
        AccountKind::Patient => "patient/*.rs patient/Consent.cruds openid fhirUser offline_access",
        AccountKind::Practitioner => "user/*.cruds openid fhirUser",
    }
}

pub fn read_password(file: Option<&Path>) -> Result<String, String> {
    match file {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| format!("{}: {e}", path.display()))
            .map(|text| text.lines().next().unwrap_or("").to_string()),
        None => std::env::var("MEDLEDGER_PASSWORD")
            .map_err(|_| "give --password-file or set MEDLEDGER_PASSWORD".to_string()),
    }
}

pub fn account(command: AccountCommand) -> Result<(), String> {
    match command {
        AccountCommand::Add {
            data_dir,
            identity,
            scopes,
            password_file,
        } => {
            let person = Identity::load(&identity).map_err(|e| e.to_string())?;
            let kind = if person.certificate.is_some() {
                AccountKind::Practitioner
            } else {
                AccountKind::Patient
            };
            let password = read_password(password_file.as_deref())?;
            let scopes = scopes.unwrap_or_else(|| default_scopes(kind).to_string());
            let (issuer, secret) =
                add_account(&data_dir, &identity, &person.id, kind, &password, &scopes)?;
            println!("account {} added at {}", person.id, data_dir.display());
            println!(
                "one-time code secret (shown once): {}",
                base32_encode(&secret)
            );
            println!("{}", otpauth_uri(&issuer, &person.id, &secret));
            Ok(())
        }
        AccountCommand::AddClient {
            data_dir,
            client_id,
            jwks,
            acts_as,
            scopes,
        } => {
            let jwks: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(&jwks).map_err(|e| format!("{}: {e}", jwks.display()))?,
            )
            .map_err(|e| format!("{}: {e}", jwks.display()))?;
            let store =
                AccountStore::open(&data_dir.join(ACCOUNTS_FILE)).map_err(|e| e.to_string())?;
            if store.account(&acts_as).is_none() {
                return Err(format!(
                    "{acts_as} has no account at this node: the client signs with that user's key, so add the user first"
                ));
            }
            store
                .add_client(Client {
                    client_id: client_id.clone(),
                    jwks,
                    allowed_scopes: scopes,
                    acts_as,
                })
                .map_err(|e| e.to_string())?;
            println!("client {client_id} enrolled at {}", data_dir.display());
            Ok(())
        }
        AccountCommand::AddApp {
            data_dir,
            client_id,
            redirect_uris,
            scopes,
        } => {
            let store =
                AccountStore::open(&data_dir.join(ACCOUNTS_FILE)).map_err(|e| e.to_string())?;
            store
                .add_app(App {
                    client_id: client_id.clone(),
                    redirect_uris,
                    allowed_scopes: scopes,
                })
                .map_err(|e| e.to_string())?;
            println!("app {client_id} registered at {}", data_dir.display());
            Ok(())
        }
        AccountCommand::RemoveApp {
            data_dir,
            client_id,
        } => {
            let store =
                AccountStore::open(&data_dir.join(ACCOUNTS_FILE)).map_err(|e| e.to_string())?;
            store.remove_app(&client_id).map_err(|e| e.to_string())?;
            println!("app {client_id} removed");
            Ok(())
        }
        AccountCommand::Remove { data_dir, username } => {
            let store =
                AccountStore::open(&data_dir.join(ACCOUNTS_FILE)).map_err(|e| e.to_string())?;
            store.remove_account(&username).map_err(|e| e.to_string())?;
            println!("account {username} removed");
            Ok(())
        }
    }
}

fn absolute(path: &Path) -> Result<String, String> {
    std::fs::canonicalize(path)
        .map(|p| p.display().to_string())
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Adds an account to a node's accounts file; returns the issuer name for authenticator
/// apps and the one-time code secret.
pub fn add_account(
    data_dir: &Path,
    identity_file: &Path,
    username: &str,
    kind: AccountKind,
    password: &str,
    scopes: &str,
) -> Result<(String, Vec<u8>), String> {
    let store = AccountStore::open(&data_dir.join(ACCOUNTS_FILE)).map_err(|e| e.to_string())?;
    let secret = store
        .add_account(username, kind, password, scopes, &absolute(identity_file)?)
        .map_err(|e| e.to_string())?;
    let issuer = format!(
        "medledger {}",
        data_dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("node")
    );
    Ok((issuer, secret))
}

/// Logs in at a node (password and the current one-time code) and returns the token
/// response.
pub fn login(
    node: &str,
    username: &str,
    password: &str,
    totp_secret: &str,
    scope: &str,
) -> Result<serde_json::Value, String> {
    let secret = base32_decode(totp_secret).map_err(|e| e.to_string())?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let code = totp_code(&secret, now);
    let form = [
        ("grant_type", "password"),
        ("username", username),
        ("password", password),
        ("totp", code.as_str()),
        ("scope", scope),
    ];
    let url = format!("{}/auth/token", node.trim_end_matches('/'));
    let response = ureq::post(&url)
        .config()
        .http_status_as_error(false)
        .build()
        .send_form(form)
        .map_err(|e| format!("{url}: {e}"))?;
    let status = response.status();
    let body: serde_json::Value = response
        .into_body()
        .read_json()
        .map_err(|e| format!("{url}: {e}"))?;
    if !status.is_success() {
        return Err(format!(
            "login refused: {}",
            body.get("error_description")
                .and_then(|d| d.as_str())
                .unwrap_or("unknown error")
        ));
    }
    Ok(body)
}

/// The demo's password for its FHIR logins (synthetic people on a local consortium).
pub const DEMO_PASSWORD: &str = "demo-only-password-1";

/// The demo's FHIR logins: accounts at the nodes, and their description (base URLs,
/// usernames, code secrets) for FHIR clients and the tests, which
/// `write_demo_description` saves once the demo is ready for them. `nodes` is (org, API
/// URL, data directory); `people` is (username, key file, org whose node the person logs
/// in at).
pub fn demo_logins(
    dir: &Path,
    nodes: &[(String, String, PathBuf)],
    people: &[(String, PathBuf, String)],
    patient: &str,
) -> Result<serde_json::Value, String> {
    let password_file = dir.join("keys").join("fhir-password.txt");
    medledger_node::consortium::write_private(&password_file, DEMO_PASSWORD.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut accounts = Vec::new();
    for (username, identity, org) in people {
        let (_, _, data_dir) = nodes
            .iter()
            .find(|(o, _, _)| o == org)
            .ok_or_else(|| format!("no node of {org}"))?;
        let person = Identity::load(identity).map_err(|e| e.to_string())?;
        let kind = if person.certificate.is_some() {
            AccountKind::Practitioner
        } else {
            AccountKind::Patient
        };
        let scopes = default_scopes(kind);
        let (_, secret) = add_account(data_dir, identity, username, kind, DEMO_PASSWORD, scopes)?;
        let node = nodes
            .iter()
            .find(|(o, _, _)| o == org)
            .map(|(_, url, _)| url.clone());
        accounts.push(serde_json::json!({
            "username": username,
            "kind": if kind == AccountKind::Patient { "patient" } else { "practitioner" },
            "node": node,
            "totp_secret": base32_encode(&secret),
            "scopes": scopes,
        }));
    }
    let description = serde_json::json!({
        "password_file": password_file.display().to_string(),
        "nodes": nodes.iter().map(|(org, url, _)| serde_json::json!({
            "org": org,
            "api": url,
            "fhir_base": format!("{url}/fhir"),
            "token_endpoint": format!("{url}/auth/token"),
        })).collect::<Vec<_>>(),
        "accounts": accounts,
        "patient": patient,
    });
    Ok(description)
}

/// Where the demo describes its logins for FHIR clients.
pub fn demo_description_file(dir: &Path) -> PathBuf {
    dir.join("fhir-demo.json")
}

/// Saves the logins' description once the demo's own story is over. A client that starts
/// when the file appears (the FHIR client test does) then acts as dr-alice alone: her node
/// and the story each taking her next nonce at the same time would make one of the two a
/// stale-nonce rejection. The file holds code secrets: owner-only, and replaced whole, so
/// a reader never sees half of it.
pub fn write_demo_description(dir: &Path, description: &serde_json::Value) -> Result<(), String> {
    let bytes = serde_json::to_vec_pretty(description).map_err(|e| e.to_string())?;
    medledger_node::auth::write_atomic(&demo_description_file(dir), &bytes)
        .map_err(|e| e.to_string())
}

/// A FHIR GET with a bearer token; the status and the JSON body.
pub fn fhir_get(url: &str, token: &str) -> Result<(u16, serde_json::Value), String> {
    let response = ureq::get(url)
        .header("Authorization", &format!("Bearer {token}"))
        .header("Accept", "application/fhir+json")
        .config()
        .http_status_as_error(false)
        .build()
        .call()
        .map_err(|e| format!("{url}: {e}"))?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .with_config()
        .limit(64 * 1024 * 1024)
        .read_json()
        .map_err(|e| format!("{url}: {e}"))?;
    Ok((status, body))
}

//! The record store conformance suite: every `RecordStore` implementation must pass it.

use std::sync::Arc;

use medledger_node::keywrap::{EncryptionKeyPair, WrapContext, WrappedKey};
use medledger_node::records::{
    EmbeddedStore, PostgresStore, RecordStore, RecordStoreError, BLOB_BYTES_MAX, CONNECTIONS_MAX,
    LIST_MAX,
};
use medledger_node::sealing::{content_id, seal};

mod common;
use common::TestPostgres;

/// Opens the store under test; called again to check that what was written survives a
/// reopen (the previous handle is dropped first).
type Opener<'a> = &'a dyn Fn() -> Box<dyn RecordStore>;

fn blob(n: u32) -> (String, Vec<u8>) {
    let sealed = seal(format!("version {n}").as_bytes(), b"r/1/hospital-a").unwrap();
    (sealed.cid, sealed.ciphertext)
}

fn envelope() -> WrappedKey {
    let context = WrapContext {
        record: "r",
        version: 1,
        custodian: "hospital-a",
        recipient: "hospital-a",
    };
    EncryptionKeyPair::generate()
        .public_key()
        .wrap_key(&[5; 32], &context)
        .unwrap()
}

fn conformance(open: Opener<'_>) {
    blobs_round_trip_and_are_checked(open);
    listing_pages_through_every_blob_once(open);
    envelopes_are_kept_per_blob_and_recipient(open);
    a_version_is_stored_whole(open);
    malformed_names_never_reach_the_store(open);
    concurrent_writers_lose_nothing(open);
    concurrent_versions_all_land_whole(open);
}

fn blobs_round_trip_and_are_checked(open: Opener<'_>) {
    let store = open();
    let (cid, bytes) = blob(1);
    assert_eq!(store.get_blob(&cid), Ok(None));
    store.put_blob(&cid, &bytes).unwrap();
    assert_eq!(store.get_blob(&cid), Ok(Some(bytes.clone())));
    // Storing it again changes nothing.
    store.put_blob(&cid, &bytes).unwrap();
    assert_eq!(store.get_blob(&cid), Ok(Some(bytes.clone())));

    // Bytes under another blob's id, and a flipped byte, are refused and not stored.
    let (other_cid, other_bytes) = blob(2);
    let refused = store.put_blob(&other_cid, &bytes);
    assert!(
        matches!(refused, Err(RecordStoreError::WrongContentId { .. })),
        "{refused:?}"
    );
    let mut flipped = other_bytes.clone();
    flipped[0] ^= 1;
    assert!(matches!(
        store.put_blob(&other_cid, &flipped),
        Err(RecordStoreError::WrongContentId { .. })
    ));
    assert_eq!(store.get_blob(&other_cid), Ok(None));

    // Empty and largest blobs are stored; one byte more is refused.
    let empty_cid = content_id(b"");
    store.put_blob(&empty_cid, b"").unwrap();
    assert_eq!(store.get_blob(&empty_cid), Ok(Some(Vec::new())));
    let largest = vec![0xA5; BLOB_BYTES_MAX];
    let largest_cid = content_id(&largest);
    store.put_blob(&largest_cid, &largest).unwrap();
    let too_large = vec![0xA5; BLOB_BYTES_MAX + 1];
    assert_eq!(
        store.put_blob(&content_id(&too_large), &too_large),
        Err(RecordStoreError::TooLarge(BLOB_BYTES_MAX + 1))
    );
    drop(too_large);

    // Everything written is there after a reopen.
    drop(store);
    let store = open();
    assert_eq!(store.get_blob(&cid), Ok(Some(bytes)));
    assert_eq!(
        store.get_blob(&largest_cid).unwrap().map(|b| b.len()),
        Some(BLOB_BYTES_MAX)
    );
}

fn listing_pages_through_every_blob_once(open: Opener<'_>) {
    let store = open();
    let mut written: Vec<String> = (100..160)
        .map(|n| {
            let (cid, bytes) = blob(n);
            store.put_blob(&cid, &bytes).unwrap();
            cid
        })
        .collect();
    written.sort();
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store.blob_ids(after.as_deref(), 7).unwrap();
        assert!(page.len() <= 7);
        if page.is_empty() {
            break;
        }
        assert!(page.windows(2).all(|w| w[0] < w[1]), "ascending: {page:?}");
        if let Some(after) = &after {
            assert!(page[0] > *after);
        }
        after = page.last().cloned();
        seen.extend(page);
    }
    let all = store.blob_ids(None, usize::MAX).unwrap();
    assert!(all.len() <= LIST_MAX);
    assert_eq!(seen, all, "paging yields exactly the full listing");
    for cid in &written {
        assert_eq!(seen.iter().filter(|id| *id == cid).count(), 1, "{cid}");
    }
}

fn envelopes_are_kept_per_blob_and_recipient(open: Opener<'_>) {
    let store = open();
    let (cid, bytes) = blob(200);
    let (other_cid, _) = blob(201);
    store.put_blob(&cid, &bytes).unwrap();
    let for_custodian = envelope();
    let for_patient = envelope();
    store
        .put_envelope(&cid, "hospital-a", &for_custodian)
        .unwrap();
    store.put_envelope(&cid, "pat-1234", &for_patient).unwrap();
    assert_eq!(
        store.get_envelope(&cid, "hospital-a"),
        Ok(Some(for_custodian.clone()))
    );
    assert_eq!(
        store.get_envelope(&cid, "pat-1234"),
        Ok(Some(for_patient.clone()))
    );
    assert_eq!(store.get_envelope(&cid, "clinic-b"), Ok(None));
    assert_eq!(store.get_envelope(&other_cid, "hospital-a"), Ok(None));
    // A re-wrapped key replaces the earlier envelope for the same pair only.
    let rewrapped = envelope();
    store.put_envelope(&cid, "pat-1234", &rewrapped).unwrap();
    drop(store);
    let store = open();
    assert_eq!(store.get_envelope(&cid, "pat-1234"), Ok(Some(rewrapped)));
    assert_eq!(
        store.get_envelope(&cid, "hospital-a"),
        Ok(Some(for_custodian))
    );
}

fn a_version_is_stored_whole(open: Opener<'_>) {
    let store = open();
    let (cid, bytes) = blob(300);
    let (attachment, attachment_bytes) = blob(301);
    let (custodian, patient) = (envelope(), envelope());
    store
        .put_version(
            &[(&attachment, &attachment_bytes), (&cid, &bytes)],
            &[(&cid, "hospital-a", &custodian), (&cid, "pt-77", &patient)],
        )
        .unwrap();
    drop(store);
    let store = open();
    assert_eq!(store.get_blob(&cid), Ok(Some(bytes.clone())));
    assert_eq!(store.get_blob(&attachment), Ok(Some(attachment_bytes)));
    assert_eq!(store.get_envelope(&cid, "hospital-a"), Ok(Some(custodian)));
    assert_eq!(store.get_envelope(&cid, "pt-77"), Ok(Some(patient)));
    // A blob that is not its content id refuses the version with a typed error.
    let (other_cid, _) = blob(302);
    let refused = store.put_version(&[(&other_cid, &bytes)], &[]);
    assert!(
        matches!(refused, Err(RecordStoreError::WrongContentId { .. })),
        "{refused:?}"
    );
    assert_eq!(store.get_blob(&other_cid), Ok(None));
}

fn malformed_names_never_reach_the_store(open: Opener<'_>) {
    let store = open();
    let wrapped = envelope();
    let (cid, bytes) = blob(300);
    for bad in [
        "",
        "bafkrei",
        "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG",
        "bafkrei'; DROP TABLE blobs; --aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        &cid.to_uppercase(),
        &format!("{cid}a"),
    ] {
        assert!(
            matches!(store.get_blob(bad), Err(RecordStoreError::NotAContentId(_))),
            "{bad:?}"
        );
        assert!(matches!(
            store.put_blob(bad, &bytes),
            Err(RecordStoreError::NotAContentId(_))
        ));
        assert!(matches!(
            store.put_envelope(bad, "hospital-a", &wrapped),
            Err(RecordStoreError::NotAContentId(_))
        ));
    }
    for bad in ["", "a b", "x\0y", "é", &"r".repeat(257)] {
        assert_eq!(
            store.put_envelope(&cid, bad, &wrapped),
            Err(RecordStoreError::BadRecipient),
            "{bad:?}"
        );
        assert_eq!(
            store.get_envelope(&cid, bad),
            Err(RecordStoreError::BadRecipient)
        );
    }
    assert_eq!(store.get_blob(&cid), Ok(None));
}

fn concurrent_writers_lose_nothing(open: Opener<'_>) {
    let store: Arc<dyn RecordStore> = Arc::from(open());
    let written: Vec<Vec<(String, Vec<u8>)>> = std::thread::scope(|scope| {
        // More writers than a pooled store opens connections, so some wait for one.
        let handles: Vec<_> = (0..CONNECTIONS_MAX as u32 + 4)
            .map(|writer| {
                let store = store.clone();
                scope.spawn(move || {
                    (0..20u32)
                        .map(|n| {
                            let (cid, bytes) = blob(1_000 + writer * 100 + n);
                            store.put_blob(&cid, &bytes).unwrap();
                            store
                                .put_envelope(&cid, &format!("writer-{writer}"), &envelope())
                                .unwrap();
                            (cid, bytes)
                        })
                        .collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    drop(store);
    let store = open();
    for (writer, blobs) in written.iter().enumerate() {
        for (cid, bytes) in blobs {
            assert_eq!(store.get_blob(cid).unwrap().as_ref(), Some(bytes));
            assert!(store
                .get_envelope(cid, &format!("writer-{writer}"))
                .unwrap()
                .is_some());
        }
    }
}

/// A version as a writer stores it: its blob, an attachment and two envelopes.
struct Version {
    cid: String,
    bytes: Vec<u8>,
    attachment: (String, Vec<u8>),
    envelopes: [(String, WrappedKey); 2],
}

fn concurrent_versions_all_land_whole(open: Opener<'_>) {
    // Many writers storing whole versions at once, started together so that their writes
    // meet, each also sending a refused write between its versions: every version is stored
    // whole and reads back the same after a reopen, and every refused write is refused with
    // its own typed error, whatever it shared a commit with.
    const WRITERS: u32 = 48;
    const VERSIONS: u32 = 12;
    let store: Arc<dyn RecordStore> = Arc::from(open());
    let start = std::sync::Barrier::new(WRITERS as usize);
    let written: Vec<Version> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..WRITERS)
            .map(|writer| {
                let (store, start) = (store.clone(), &start);
                scope.spawn(move || {
                    start.wait();
                    let mut versions = Vec::new();
                    for n in 0..VERSIONS {
                        let (cid, bytes) = blob(10_000 + writer * 100 + n);
                        let attachment = blob(20_000 + writer * 100 + n);
                        let envelopes = [
                            ("hospital-a".to_string(), envelope()),
                            (format!("pt-{writer}"), envelope()),
                        ];
                        store
                            .put_version(
                                &[(&attachment.0, &attachment.1), (&cid, &bytes)],
                                &[
                                    (&cid, &envelopes[0].0, &envelopes[0].1),
                                    (&cid, &envelopes[1].0, &envelopes[1].1),
                                ],
                            )
                            .unwrap();
                        // Another version's bytes under this one's id: refused, alone.
                        let refused = store.put_version(&[(&cid, &attachment.1)], &[]);
                        assert!(
                            matches!(refused, Err(RecordStoreError::WrongContentId { .. })),
                            "{refused:?}"
                        );
                        versions.push(Version {
                            cid,
                            bytes,
                            attachment,
                            envelopes,
                        });
                    }
                    versions
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert_eq!(written.len(), (WRITERS * VERSIONS) as usize);
    drop(store);
    let store = open();
    for version in &written {
        assert_eq!(
            store.get_blob(&version.cid),
            Ok(Some(version.bytes.clone()))
        );
        let (attachment, attachment_bytes) = &version.attachment;
        assert_eq!(
            store.get_blob(attachment),
            Ok(Some(attachment_bytes.clone()))
        );
        for (recipient, wrapped) in &version.envelopes {
            assert_eq!(
                store.get_envelope(&version.cid, recipient),
                Ok(Some(wrapped.clone())),
                "{} for {recipient}",
                version.cid
            );
        }
    }
}

#[test]
fn the_embedded_store_conforms() {
    // Proves the embedded store (the default) meets the record store contract: checked
    // content ids, durable round trips across reopen, gap-free listing, envelopes per
    // recipient, malformed names refused, concurrent writers, whole versions from many
    // writers at once (which its writer commits in groups).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    conformance(&|| Box::new(EmbeddedStore::open(&path).unwrap()));
}

/// Set in the child process of `acknowledged_writes_survive_a_kill`: the directory of the
/// store it writes to until it is killed.
const WRITE_UNTIL_KILLED: &str = "MEDLEDGER_TEST_WRITE_UNTIL_KILLED";

/// The child's side: writers storing versions at once, each acknowledged version printed
/// (`ack <cid> <recipient>`) as soon as `put_version` returns. Stops by itself only if
/// nobody kills it.
fn write_until_killed(dir: &std::path::Path) {
    let store = Arc::new(EmbeddedStore::open(dir).unwrap());
    std::thread::scope(|scope| {
        for writer in 0..16u32 {
            let store = store.clone();
            scope.spawn(move || {
                let recipient = format!("writer-{writer}");
                for n in 0..5_000u32 {
                    let (cid, bytes) = blob(writer * 100_000 + n);
                    store
                        .put_version(&[(&cid, &bytes)], &[(&cid, &recipient, &envelope())])
                        .unwrap();
                    println!("ack {cid} {recipient}");
                }
            });
        }
    });
}

#[test]
fn acknowledged_writes_survive_a_kill() {
    // Proves nothing the embedded store acknowledged is lost when its process dies: a
    // process writing from many threads at once is killed (SIGKILL) mid-stream, and every
    // version it had been told was stored is in the store when it is reopened (redb
    // recovering from a kill mid-commit). A kill keeps what reached the page cache, so the
    // sync before each answer is checked in the store's own tests (records/embedded.rs).
    if let Some(dir) = std::env::var_os(WRITE_UNTIL_KILLED) {
        write_until_killed(std::path::Path::new(&dir));
        return;
    }
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "acknowledged_writes_survive_a_kill",
            "--nocapture",
        ])
        .env(WRITE_UNTIL_KILLED, dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut output = std::io::BufReader::new(child.stdout.take().unwrap());
    // The next whole line the child printed (the test harness prints too); None at the end.
    let mut next_line = move || {
        let mut line = String::new();
        match output.read_line(&mut line) {
            Ok(n) if n > 0 && line.ends_with('\n') => Some(line),
            _ => None,
        }
    };
    let acknowledgement = |line: &str| {
        let rest = &line[line.find("ack ")? + 4..];
        let (cid, recipient) = rest.trim_end().split_once(' ')?;
        Some((cid.to_string(), recipient.to_string()))
    };
    let mut acknowledged: Vec<(String, String)> = Vec::new();
    // Killed once a good number of writes were acknowledged, while the writers are busy.
    while acknowledged.len() < 400 {
        let line = next_line().expect("the writing process ended before it was killed");
        acknowledged.extend(acknowledgement(&line));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // Acknowledgements printed before the kill count too.
    while let Some(line) = next_line() {
        acknowledged.extend(acknowledgement(&line));
    }
    let store = EmbeddedStore::open(dir.path()).unwrap();
    for (cid, recipient) in &acknowledged {
        let bytes = store.get_blob(cid).unwrap();
        assert_eq!(
            bytes.map(|b| content_id(&b)).as_ref(),
            Some(cid),
            "acknowledged {cid} is lost"
        );
        assert!(
            store.get_envelope(cid, recipient).unwrap().is_some(),
            "the acknowledged envelope of {cid} for {recipient} is lost"
        );
    }
}

#[test]
fn the_postgresql_store_conforms() {
    // Proves the PostgreSQL store meets the same contract as the embedded one, against a real
    // server: checked content ids, durable round trips across reconnects, gap-free listing,
    // envelopes per recipient, malformed names refused (never spliced into SQL), concurrent
    // writers and whole versions from many writers at once through the connection pool.
    let server = TestPostgres::start();
    let connection = server.connection.clone();
    conformance(&|| Box::new(PostgresStore::connect(&connection).unwrap()));
}

#[test]
fn a_postgresql_store_that_cannot_be_reached_is_a_clear_error() {
    // Proves a wrong connection string or an unreachable server is a typed error naming the
    // store, not a panic or a hang.
    for connection in [
        "port=notaport",
        "host=127.0.0.1 port=1 user=x connect_timeout=2",
    ] {
        match PostgresStore::connect(connection) {
            Err(RecordStoreError::Backend { store, detail }) => {
                assert_eq!(store, "postgresql");
                assert!(!detail.is_empty());
            }
            Err(other) => panic!("{connection}: {other:?}"),
            Ok(_) => panic!("{connection}: connected"),
        }
    }
}

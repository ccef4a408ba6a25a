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

#[test]
fn the_embedded_store_conforms() {
    // Proves the embedded store (the default) meets the record store contract: checked
    // content ids, durable round trips across reopen, gap-free listing, envelopes per
    // recipient, malformed names refused, concurrent writers.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    conformance(&|| Box::new(EmbeddedStore::open(&path).unwrap()));
}

#[test]
fn the_postgresql_store_conforms() {
    // Proves the PostgreSQL store meets the same contract as the embedded one, against a real
    // server: checked content ids, durable round trips across reconnects, gap-free listing,
    // envelopes per recipient, malformed names refused (never spliced into SQL), concurrent
    // writers through the connection pool.
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

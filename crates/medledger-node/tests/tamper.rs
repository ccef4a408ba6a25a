//! Fault tests of the stored ledger: a byte changed on disk does not go unnoticed.
//!
//! Both tests build a small ledger through the node's own store (genesis and three blocks,
//! six transactions, one of them rejected), close it cleanly, compact it with redb's own
//! compaction and change bytes of its file. Compaction keeps every live page and drops the
//! superseded ones, which hold no ledger content: it shrinks the file from 172 KiB to 64 KiB,
//! and every byte tried costs an open of the whole image.
//!
//! A change is detected when an operator running `medledger verify` would see it: the image
//! is refused when it is opened (`Store::open_bytes`, which checks redb's page checksums), or
//! `verify_store` returns an error. A panic is neither, and fails the tests.
//!
//! Not covered: a file left by a crash rather than a clean close still holds the commit before
//! the last one in redb's second commit slot, and a damaged first slot makes redb fall back to
//! it, silently, as after a torn write. The ledger then reads one block shorter and verifies;
//! only a tree head known from elsewhere can tell.

use std::time::Instant;

use medledger_core::block::ChainHead;
use medledger_node::store::{Store, StoreError, LEDGER_FILE};
use medledger_node::verify::verify_store;

mod common;

use common::build_ledger;

/// The start of a redb file that holds its header and both commit slots (320 bytes in redb 4):
/// the sweep tries every byte of it, with two modifications each.
const SUPER_HEADER_BYTES: usize = 512;

/// Threads of the sweep: the machines this runs on have two cores.
const SWEEP_THREADS: usize = 2;

/// Proves that every single-byte modification of a stored ledger's file that changes
/// its content is detected by opening and verifying it, and that none panics.
///
/// "Changes its content" is judged by reading the modified image the way the node does: it
/// changes content when it fails to open, fails to read, or reads differently from the
/// original (head, every block up to the stored count, every state entry). An image that
/// reads identically only differs in free space, padding or bookkeeping redb repairs, and
/// needs no detection.
#[test]
fn every_byte_change_of_a_stored_ledger_that_changes_content_is_detected() {
    let image = stored_ledger_image();
    let original_store = Store::open_bytes(image.clone()).expect("the stored ledger opens");
    let original = read_content(&original_store).expect("the stored ledger reads");
    let report = verify_store(&original_store).expect("the stored ledger verifies");
    drop(original_store);
    assert_eq!(
        (report.blocks, report.txs, report.rejected),
        (4, 6, 1),
        "the ledger is genesis and three blocks of six transactions, one rejected"
    );

    // Every byte of the file, once with XOR 0xFF; the super-header (header and commit
    // slots) also with XOR 0x01, since a single-bit change there is the subtlest.
    let header_bytes = SUPER_HEADER_BYTES.min(image.len());
    let mut trials: Vec<(usize, u8)> = (0..image.len()).map(|position| (position, 0xFF)).collect();
    trials.extend((0..header_bytes).map(|position| (position, 0x01)));
    let positions_tried = image.len();

    let started = Instant::now();
    let mut fates: Vec<(usize, u8, Fate)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..SWEEP_THREADS)
            .map(|worker| {
                let (image, original, trials) = (&image, &original, &trials);
                scope.spawn(move || {
                    trials
                        .iter()
                        .skip(worker)
                        .step_by(SWEEP_THREADS)
                        .map(|&(position, mask)| {
                            (position, mask, fate_of(image, original, position, mask))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|worker| worker.join().expect("a sweep thread ends"))
            .collect()
    });
    let elapsed = started.elapsed();
    fates.sort_unstable_by_key(|&(position, mask, _)| (position, mask));

    let count = |fate: Fate| fates.iter().filter(|(_, _, f)| *f == fate).count();
    let list = |fate: Fate| {
        fates
            .iter()
            .filter(|(_, _, f)| *f == fate)
            .map(|(position, mask, _)| format!("{position}^{mask:#04x}"))
            .collect::<Vec<_>>()
    };
    let changed = fates.len() - count(Fate::Unchanged);
    let detected = count(Fate::RefusedAtOpen) + count(Fate::FailedVerify);
    // A position changed content when any of its modifications did, and was detected when
    // every modification of it that changed content was.
    let mut positions_changed = 0;
    let mut positions_detected = 0;
    for at_position in fates.chunk_by(|a, b| a.0 == b.0) {
        if at_position
            .iter()
            .any(|(_, _, fate)| fate.changed_content())
        {
            positions_changed += 1;
            if at_position
                .iter()
                .all(|(_, _, fate)| !fate.changed_content() || fate.detected())
            {
                positions_detected += 1;
            }
        }
    }
    println!("tamper sweep over a {} byte store file:", image.len());
    println!(
        "  positions tried: {positions_tried} of {} (every byte with XOR 0xFF, the first \
         {header_bytes} also with XOR 0x01)",
        image.len()
    );
    println!(
        "  positions where a modification changed ledger content: {positions_changed}, \
         all of whose modifications were detected: {positions_detected}"
    );
    println!(
        "  modifications: {} tried, {changed} changed ledger content, {detected} detected \
         ({} refused at open, {} failed verify), {} missed, {} panicked",
        fates.len(),
        count(Fate::RefusedAtOpen),
        count(Fate::FailedVerify),
        count(Fate::Missed),
        count(Fate::Panicked)
    );
    println!(
        "  took {:.1} s on {SWEEP_THREADS} threads",
        elapsed.as_secs_f64()
    );
    assert!(changed > 0, "the sweep reached no ledger content");
    assert_eq!(
        list(Fate::Missed),
        Vec::<String>::new(),
        "modifications (position^mask) that changed content yet verified"
    );
    assert_eq!(
        list(Fate::Panicked),
        Vec::<String>::new(),
        "modifications (position^mask) that panicked instead of failing"
    );
}

/// Proves that `verify` names the block whose stored bytes changed, and that the verify
/// command's open refuses such an image before `verify` runs.
#[test]
fn a_changed_byte_in_a_stored_block_is_reported_at_that_block() {
    let image = stored_ledger_image();
    let height = 2;
    let block = Store::open_bytes(image.clone())
        .expect("the stored ledger opens")
        .block_bytes(height)
        .expect("blocks read")
        .expect("block 2 is stored");
    // A byte inside the first transaction's signature: the block still decodes, but its
    // transaction no longer verifies, so its outcome cannot be reproduced.
    let field = b"\"signature\":\"";
    let in_block = find_all(&block, field)
        .first()
        .copied()
        .expect("block 2 holds a signed transaction")
        + field.len()
        + 8;
    // Superseded copies of the block may lie in free pages; change the byte in every copy so
    // that the live one is among them.
    let copies = find_all(&image, &block);
    assert!(!copies.is_empty(), "block 2's bytes appear in the file");
    let mut tampered = image.clone();
    for start in &copies {
        tampered[start + in_block] ^= 0x01;
    }

    // The verify command's open checks redb's page checksums and refuses the image.
    assert!(
        Store::open_bytes(tampered.clone()).is_err(),
        "an image with a changed block opens despite redb's checksums"
    );

    // The node's own open does not check them, so the changed byte reaches `verify` itself.
    let dir = tempfile::tempdir().expect("a temporary directory");
    std::fs::write(dir.path().join(LEDGER_FILE), &tampered).expect("the image is written");
    let store = Store::open(dir.path()).expect("the node opens the tampered store");
    let failure = verify_store(&store).expect_err("a changed block verifies");
    println!(
        "changed byte {in_block} of block {height} ({} copies in the file): {failure}",
        copies.len()
    );
    assert_eq!(failure.height(), Some(height), "{failure}");
}

/// What became of one modification of the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// The image reads exactly as the original.
    Unchanged,
    /// `Store::open_bytes` refused the image.
    RefusedAtOpen,
    /// The image opened, did not read as the original, and `verify_store` failed.
    FailedVerify,
    /// The image opened, did not read as the original, and `verify_store` passed.
    Missed,
    /// Opening, reading or verifying panicked.
    Panicked,
}

impl Fate {
    fn changed_content(self) -> bool {
        self != Fate::Unchanged
    }

    fn detected(self) -> bool {
        matches!(self, Fate::RefusedAtOpen | Fate::FailedVerify)
    }
}

fn fate_of(image: &[u8], original: &Content, position: usize, mask: u8) -> Fate {
    let mut modified = image.to_vec();
    modified[position] ^= mask;
    std::panic::catch_unwind(|| {
        let Ok(store) = Store::open_bytes(modified) else {
            return Fate::RefusedAtOpen;
        };
        if read_content(&store).ok().as_ref() == Some(original) {
            return Fate::Unchanged;
        }
        match verify_store(&store) {
            Err(_) => Fate::FailedVerify,
            Ok(_) => Fate::Missed,
        }
    })
    .unwrap_or(Fate::Panicked)
}

/// The ledger content of a store image, read through the store's public interface: the head
/// (the meta table, decoded), every block from 0 to the stored count (the blocks table; a key
/// past the count cannot appear without one below it going missing, as counts come from the
/// keys) and every state entry (the state table).
#[derive(Debug, PartialEq, Eq)]
struct Content {
    head: Option<ChainHead>,
    blocks: Vec<Option<Vec<u8>>>,
    state: Vec<(String, Vec<u8>)>,
}

fn read_content(store: &Store) -> Result<Content, StoreError> {
    let head = store.head()?;
    let blocks = (0..store.block_count()?)
        .map(|height| store.block_bytes(height))
        .collect::<Result<_, _>>()?;
    let mut state = Vec::new();
    store
        .snapshot()?
        .for_each(|key, value| state.push((key.to_string(), value.to_vec())))?;
    Ok(Content {
        head,
        blocks,
        state,
    })
}

/// Writes the common small ledger through the node's store, closes and compacts it, and
/// returns its file.
fn stored_ledger_image() -> Vec<u8> {
    let dir = tempfile::tempdir().expect("a temporary directory");
    build_ledger(dir.path());
    let path = dir.path().join(LEDGER_FILE);
    let mut db = redb::Database::open(&path).expect("the closed store opens in redb");
    while db.compact().expect("the store compacts") {}
    drop(db);
    std::fs::read(&path).expect("the store file reads")
}

/// Every offset at which `needle` occurs in `haystack`.
fn find_all(haystack: &[u8], needle: &[u8]) -> Vec<usize> {
    haystack
        .windows(needle.len())
        .enumerate()
        .filter(|(_, window)| *window == needle)
        .map(|(offset, _)| offset)
        .collect()
}

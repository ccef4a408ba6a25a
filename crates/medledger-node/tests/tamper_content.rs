//! Fault tests of verify's own checks: every change of a stored ledger's content fails
//! `verify_content`, with no help from the storage engine.
//!
//! tests/tamper.rs changes bytes of a redb file, and redb's page checksums refuse all of those
//! images at open. The checksums are unkeyed: whoever rewrites the file through redb
//! recomputes them. So these tests change the content itself, as such a writer would: the
//! ledger (genesis and three blocks, six transactions, one of them rejected) is read out of
//! the node's store into `StoredContent`, and every byte of every block, of the head, of
//! every state key and of every state value is changed in turn, and the entries themselves
//! are removed, added, repeated and moved.
//!
//! A change is detected when `verify_content` returns an error. A panic is not detection
//! and fails the tests.
//!
//! Not covered, because no self-contained check can see it: a consistent rewrite. Block
//! headers are not signed, so whoever drops the last block and rolls state and head back
//! with it, or drops a transaction from a block and re-executes every block from there,
//! leaves a ledger that verifies. Only a signed tree head known from elsewhere can tell
//! (see `audit.rs`).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

use medledger_core::block::{Block, ChainHead};
use medledger_node::store::Store;
use medledger_node::verify::{verify_content, StoredContent};

mod common;

use common::build_ledger;

/// The masks each byte is changed with: the lowest bit, then the highest.
const MASKS: [u8; 2] = [0x01, 0x80];

/// The masks for state: its keys are ASCII, and XOR 0x80 makes a key that is not UTF-8, which
/// `StoredContent` cannot hold (nor can redb's `&str` keys). Its values are compared with
/// re-execution byte for byte, never decoded, so a second mask exercises the same comparison
/// at the cost of a replay from genesis per byte (11 s for this ledger in a debug build);
/// blocks and the head go through a decoder, where a byte that is not UTF-8 takes another
/// path, so they get both masks.
const STATE_MASKS: [u8; 1] = [0x01];

/// Threads of the sweep: the machines this runs on have two cores.
const SWEEP_THREADS: usize = 2;

/// Proves that every single-byte change of a stored ledger's content fails `verify_content`,
/// and that none panics: each byte of each block, block key and the head with XOR 0x01 and
/// with XOR 0x80, each byte of each state key and value with XOR 0x01.
#[test]
fn every_byte_change_of_stored_content_fails_verify() {
    let content = stored_ledger_content();
    let report = verify_content(&content).expect("the stored ledger verifies");
    assert_eq!(
        (report.blocks, report.txs, report.rejected),
        (4, 6, 1),
        "the ledger is genesis and three blocks of six transactions, one rejected"
    );

    assert!(
        content.state.iter().all(|(key, _)| key.is_ascii()),
        "state keys are ASCII, as STATE_MASKS assumes"
    );
    let places = places(&content);
    let trials: Vec<(Place, usize, u8)> = MASKS
        .iter()
        .flat_map(|&mask| {
            places
                .iter()
                .filter(move |(place, _)| place.region().masks().contains(&mask))
                .flat_map(move |&(place, length)| {
                    (0..length).map(move |offset| (place, offset, mask))
                })
        })
        .collect();

    let started = Instant::now();
    let fates: Vec<(Place, usize, u8, Fate)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..SWEEP_THREADS)
            .map(|worker| {
                let (content, trials) = (&content, &trials);
                scope.spawn(move || {
                    // Each worker changes its own copy in place and changes it back, which
                    // costs nothing next to a verify.
                    let mut copy = content.clone();
                    let fates = trials
                        .iter()
                        .skip(worker)
                        .step_by(SWEEP_THREADS)
                        .map(|&(place, offset, mask)| {
                            flip(&mut copy, place, offset, mask);
                            let fate = fate_of(&copy);
                            flip(&mut copy, place, offset, mask);
                            (place, offset, mask, fate)
                        })
                        .collect::<Vec<_>>();
                    assert!(copy == *content, "a sweep thread did not restore its copy");
                    fates
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|worker| worker.join().expect("a sweep thread ends"))
            .collect()
    });
    let elapsed = started.elapsed();

    println!(
        "byte sweep over stored content ({} blocks, {} state entries):",
        content.blocks.len(),
        content.state.len()
    );
    for region in Region::ALL {
        for &mask in region.masks() {
            let of = |fate: fn(&Fate) -> bool| {
                fates
                    .iter()
                    .filter(|(place, _, m, f)| place.region() == region && *m == mask && fate(f))
                    .count()
            };
            let bytes = places
                .iter()
                .filter(|(place, _)| place.region() == region)
                .map(|(_, length)| length)
                .sum::<usize>();
            println!(
                "  {:<12} XOR {mask:#04x}: {bytes:>5} bytes, {:>5} detected, {} missed, {} \
                 panicked",
                region.name(),
                of(|f| matches!(f, Fate::Detected(_))),
                of(|f| matches!(f, Fate::Missed)),
                of(|f| matches!(f, Fate::Panicked(_))),
            );
        }
    }
    // Where the failure is reported for a changed block: at that block, at the next one
    // (whose link no longer matches), or as a bad head (after the last block).
    let mut named = [0usize; 3];
    for (place, _, _, fate) in &fates {
        if let (Place::Block(index), Fate::Detected(height)) = (place, fate) {
            match height {
                Some(h) if *h == content.blocks[*index].0 => named[0] += 1,
                Some(h) if *h == content.blocks[*index].0 + 1 => named[1] += 1,
                None => named[2] += 1,
                Some(_) => {}
            }
        }
    }
    let detected = fates
        .iter()
        .filter(|(_, _, _, f)| matches!(f, Fate::Detected(_)))
        .count();
    let tried = fates.len();
    println!(
        "  changed block bytes reported at that block {}, at the next {}, as the head {}",
        named[0], named[1], named[2]
    );
    println!(
        "  {tried} changes tried, {detected} detected, in {:.1} s on {SWEEP_THREADS} threads",
        elapsed.as_secs_f64()
    );

    let list = |wanted: fn(&Fate) -> bool| {
        fates
            .iter()
            .filter(|(_, _, _, f)| wanted(f))
            .map(|(place, offset, mask, fate)| format!("{place:?}[{offset}]^{mask:#04x}: {fate:?}"))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        list(|f| matches!(f, Fate::Missed)),
        Vec::<String>::new(),
        "changes of content that verified"
    );
    assert_eq!(
        list(|f| matches!(f, Fate::Panicked(_))),
        Vec::<String>::new(),
        "changes of content that panicked instead of failing"
    );
    assert_eq!(tried, detected, "every change was detected");
}

/// Proves that removing, adding, repeating or moving whole entries (blocks, block keys,
/// the head, state entries) fails `verify_content`, and that none panics.
#[test]
fn every_change_of_stored_entries_fails_verify() {
    let content = stored_ledger_content();
    verify_content(&content).expect("the stored ledger verifies");
    let blocks = content.blocks.len();
    let mut changes: Vec<(String, StoredContent)> = Vec::new();
    let mut change = |name: String, edit: &dyn Fn(&mut StoredContent)| {
        let mut changed = content.clone();
        edit(&mut changed);
        assert_ne!(changed, content, "{name} changes nothing");
        changes.push((name, changed));
    };

    change("the head removed".into(), &|c| c.head = None);
    change("every block removed".into(), &|c| c.blocks.clear());
    change("the state emptied".into(), &|c| c.state.clear());
    for index in 0..blocks {
        change(format!("block {index} dropped"), &|c| {
            c.blocks.remove(index);
        });
        change(format!("block {index} stored twice"), &|c| {
            c.blocks.insert(index, c.blocks[index].clone());
        });
        change(format!("block {index} appended as block {blocks}"), &|c| {
            let bytes = c.blocks[index].1.clone();
            c.blocks.push((blocks as u64, bytes));
        });
        if index + 1 < blocks {
            change(format!("the head replaced by block {index}'s"), &|c| {
                c.head = Some(head_after(&c.blocks[index].1));
            });
        }
    }
    // The head replaced by the one before it, with the last block dropped: the state still
    // holds that block's changes, so this is not the consistent rewrite the module names.
    change("the last block dropped, the head one back".into(), &|c| {
        c.blocks.pop();
        c.head = Some(head_after(&c.blocks[blocks - 2].1));
    });
    for index in 0..blocks - 1 {
        change(format!("blocks {index} and {} swapped", index + 1), &|c| {
            c.blocks.swap(index, index + 1);
        });
        change(
            format!("the bytes of blocks {index} and {} swapped", index + 1),
            &|c| {
                let first = c.blocks[index].1.clone();
                c.blocks[index].1 = std::mem::replace(&mut c.blocks[index + 1].1, first);
            },
        );
        change(
            format!("block key {index} repeated for block {}", index + 1),
            &|c| {
                c.blocks[index + 1].0 = index as u64;
            },
        );
    }
    for index in 0..content.state.len() {
        let key = &content.state[index].0;
        change(format!("state {key:?} deleted"), &|c| {
            c.state.remove(index);
        });
        change(format!("state {key:?} stored twice"), &|c| {
            c.state.insert(index, c.state[index].clone());
        });
        // A key right after this one: an extra entry at every place in the order.
        change(format!("state {key:?}/extra added"), &|c| {
            let extra = (
                format!("{}/extra", c.state[index].0),
                c.state[index].1.clone(),
            );
            c.state.insert(index + 1, extra);
        });
        if !content.state[index].1.is_empty() {
            change(format!("state {key:?} emptied"), &|c| {
                c.state[index].1.clear()
            });
        }
        if index + 1 < content.state.len() {
            change(format!("state {key:?} and the next swapped"), &|c| {
                c.state.swap(index, index + 1);
            });
            if content.state[index].1 != content.state[index + 1].1 {
                change(format!("state {key:?} and the next swap values"), &|c| {
                    let first = c.state[index].1.clone();
                    c.state[index].1 = std::mem::replace(&mut c.state[index + 1].1, first);
                });
            }
        }
    }
    // A head that decodes to the right one from other bytes: upper-case hex digits, an
    // unknown field, white space. Only a comparison of bytes sees these.
    let head_text = String::from_utf8(content.head.clone().expect("a head")).expect("JSON");
    let block_hash = serde_json::from_slice::<ChainHead>(head_text.as_bytes())
        .expect("the head decodes")
        .block_hash
        .to_string();
    for (name, text) in [
        (
            "the head's block hash in upper case",
            head_text.replace(&block_hash, &block_hash.to_uppercase()),
        ),
        (
            "an unknown field added to the head",
            head_text.replacen('{', "{\"note\":0,", 1),
        ),
        ("white space added to the head", format!("{head_text} ")),
    ] {
        change(name.into(), &|c| c.head = Some(text.clone().into_bytes()));
    }
    change("an extra state entry first".into(), &|c| {
        c.state.insert(0, (String::new(), Vec::new()));
    });
    change("an extra state entry last".into(), &|c| {
        c.state.push(("~".into(), b"{}".to_vec()));
    });

    let started = Instant::now();
    let fates: Vec<(&str, Fate)> = changes
        .iter()
        .map(|(name, changed)| (name.as_str(), fate_of(changed)))
        .collect();
    let missed: Vec<String> = fates
        .iter()
        .filter(|(_, fate)| !matches!(fate, Fate::Detected(_)))
        .map(|(name, fate)| format!("{name}: {fate:?}"))
        .collect();
    println!(
        "{} changes of whole entries tried, {} detected, in {:.1} s",
        fates.len(),
        fates.len() - missed.len(),
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        missed,
        Vec::<String>::new(),
        "changes of entries not detected"
    );

    // Blocks out of place are reported at the first height whose block is not there.
    let fate = |name: String| {
        let found = fates.iter().find(|(n, _)| *n == name);
        found.map(|(_, fate)| fate.clone()).expect(&name)
    };
    for index in 0..blocks as u64 - 1 {
        let next = index + 1;
        for (name, height) in [
            (format!("block {index} dropped"), index),
            (format!("block {index} stored twice"), next),
            (format!("blocks {index} and {next} swapped"), index),
            (format!("block key {index} repeated for block {next}"), next),
        ] {
            assert_eq!(fate(name.clone()), Fate::Detected(Some(height)), "{name}");
        }
    }
}

/// Proves that `verify_store` reads what `StoredContent::read` reads and reaches the same
/// verdict as `verify_content` on it.
#[test]
fn verify_store_is_verify_content_of_what_the_store_holds() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    build_ledger(dir.path());
    let store = Store::open(dir.path()).expect("the store opens");
    let content = StoredContent::read(&store).expect("the store reads");
    let from_store = medledger_node::verify::verify_store(&store).expect("the store verifies");
    let from_content = verify_content(&content).expect("the content verifies");
    assert_eq!(
        serde_json::to_value(&from_store).expect("reports encode"),
        serde_json::to_value(&from_content).expect("reports encode"),
    );
    assert_eq!(
        content.head,
        Some(serde_json::to_vec(&from_store.head).expect("heads encode")),
        "the stored head is the node's encoding of the verified head"
    );
}

/// A place in the content whose bytes the sweep changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Block(usize),
    /// A block's key, as its eight big-endian bytes.
    BlockKey(usize),
    Head,
    StateKey(usize),
    StateValue(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Region {
    Blocks,
    BlockKeys,
    Head,
    StateKeys,
    StateValues,
}

impl Region {
    const ALL: [Region; 5] = [
        Region::Blocks,
        Region::BlockKeys,
        Region::Head,
        Region::StateKeys,
        Region::StateValues,
    ];

    fn masks(self) -> &'static [u8] {
        match self {
            Region::StateKeys | Region::StateValues => &STATE_MASKS,
            Region::Blocks | Region::BlockKeys | Region::Head => &MASKS,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Region::Blocks => "blocks",
            Region::BlockKeys => "block keys",
            Region::Head => "head",
            Region::StateKeys => "state keys",
            Region::StateValues => "state values",
        }
    }
}

impl Place {
    fn region(self) -> Region {
        match self {
            Place::Block(_) => Region::Blocks,
            Place::BlockKey(_) => Region::BlockKeys,
            Place::Head => Region::Head,
            Place::StateKey(_) => Region::StateKeys,
            Place::StateValue(_) => Region::StateValues,
        }
    }
}

/// Every place in `content` with its length in bytes.
fn places(content: &StoredContent) -> Vec<(Place, usize)> {
    let mut places = Vec::new();
    for (index, (_, bytes)) in content.blocks.iter().enumerate() {
        places.push((Place::Block(index), bytes.len()));
        places.push((Place::BlockKey(index), 8));
    }
    places.push((Place::Head, content.head.as_ref().map_or(0, Vec::len)));
    for (index, (key, value)) in content.state.iter().enumerate() {
        places.push((Place::StateKey(index), key.len()));
        places.push((Place::StateValue(index), value.len()));
    }
    places
}

/// XORs one byte of `content` with `mask`; doing it twice restores the content.
fn flip(content: &mut StoredContent, place: Place, offset: usize, mask: u8) {
    match place {
        Place::Block(index) => content.blocks[index].1[offset] ^= mask,
        Place::BlockKey(index) => {
            let mut key = content.blocks[index].0.to_be_bytes();
            key[offset] ^= mask;
            content.blocks[index].0 = u64::from_be_bytes(key);
        }
        Place::Head => content.head.as_mut().expect("a head")[offset] ^= mask,
        Place::StateKey(index) => {
            let mut key = std::mem::take(&mut content.state[index].0).into_bytes();
            key[offset] ^= mask;
            content.state[index].0 =
                String::from_utf8(key).expect("XOR 0x01 keeps an ASCII key ASCII");
        }
        Place::StateValue(index) => content.state[index].1[offset] ^= mask,
    }
}

/// What became of one change of the content.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Fate {
    /// `verify_content` failed, naming this block (or none).
    Detected(Option<u64>),
    /// `verify_content` passed.
    Missed,
    /// `verify_content` panicked, with this message.
    Panicked(String),
}

fn fate_of(content: &StoredContent) -> Fate {
    match catch_unwind(AssertUnwindSafe(|| verify_content(content))) {
        Ok(Err(failure)) => Fate::Detected(failure.height()),
        Ok(Ok(_)) => Fate::Missed,
        Err(panic) => Fate::Panicked(
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default(),
        ),
    }
}

/// The stored encoding of the head after a stored block.
fn head_after(block_bytes: &[u8]) -> Vec<u8> {
    let block: Block = serde_json::from_slice(block_bytes).expect("stored blocks decode");
    serde_json::to_vec(&ChainHead::of(&block.header)).expect("heads encode")
}

/// The content of a small ledger written through the node's store.
fn stored_ledger_content() -> StoredContent {
    let dir = tempfile::tempdir().expect("a temporary directory");
    build_ledger(dir.path());
    let store = Store::open(dir.path()).expect("the store opens");
    StoredContent::read(&store).expect("the store reads")
}

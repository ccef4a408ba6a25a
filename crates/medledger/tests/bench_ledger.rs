//! `medledger bench ledger` with tiny counts, so that the benchmark keeps working as the
//! cluster it measures changes. Nothing here looks at how fast anything was.

use std::process::Command;

use serde_json::Value;

#[test]
fn bench_ledger_commits_every_transaction_and_accounts_for_the_cpu_it_took() {
    // Goal: with 256 grants from 32 clients, 20 sequential ones and one second at half
    // load, the benchmark starts its three nodes, commits every grant of the throughput
    // run, exits 0, and its last line is one JSON object with the figures the benchmark
    // promises. The CPU account must add up: each node's measured work (verifying,
    // executing, staging, flushing) is part of the process's CPU time, verifying was
    // measured at all, and the budget at the goal is more than its verifications alone.
    // Timings are not checked.
    let output = Command::new(env!("CARGO_BIN_EXE_medledger"))
        .args([
            "bench",
            "ledger",
            "--txs",
            "256",
            "--clients",
            "32",
            "--latency-txs",
            "20",
            "--half-load-seconds",
            "1",
        ])
        .output()
        .expect("the medledger binary runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let shown = format!("{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "bench ledger failed:\n{shown}");
    let last = stdout.lines().last().unwrap_or("");
    let figures: Value = serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("the last line is not JSON ({e}):\n{shown}"));
    assert_eq!(figures["target"], "ledger", "{shown}");
    assert_eq!(figures["nodes"], 3, "{shown}");
    let number = |key: &str| {
        figures[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key} missing:\n{shown}"))
    };
    for key in [
        "tx_per_s",
        "latency_ms_p50",
        "latency_ms_p99",
        "verify_ceiling_tx_per_s",
        "tx_per_block",
        "tx_per_fsync",
    ] {
        assert!(number(key) > 0.0, "{key} is not positive:\n{shown}");
    }
    assert!(
        stdout.contains("peak: 256 txs from 32 clients committed"),
        "{shown}"
    );
    let parts: f64 = ["verify", "execute", "stage", "flush"]
        .iter()
        .map(|part| number(&format!("peak_{part}_us_per_tx")))
        .sum();
    // The nodes read the thread CPU clocks on Linux only; elsewhere each part is 0.
    if cfg!(target_os = "linux") {
        assert!(number("peak_verify_us_per_tx") > 0.0, "{shown}");
        assert!(number("peak_execute_us_per_tx") > 0.0, "{shown}");
    }
    assert!(parts <= number("peak_cpu_us_per_tx") + 1e-6, "{shown}");
    // The CPU each transaction's verifications take on all cores at the ceiling's rate.
    let verify_us = number("cores") * 1e6 / number("verify_ceiling_tx_per_s");
    assert!(number("cpu_us_per_tx_at_goal") > verify_us, "{shown}");
}

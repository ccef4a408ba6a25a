//! A standard FHIR client against a running consortium: fhirpy (from PyPI, in a virtual
//! environment this test makes) drives the three nodes of `medledger demo` over HTTP with
//! tokens from the nodes' own logins. The scenario is `tests/fhir_client/consortium.py`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The pinned client and its HTTP library.
const PACKAGES: [&str; 2] = ["fhirpy==2.3.1", "requests>=2.31"];

/// A child process killed when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A virtual environment with fhirpy, made once per target directory.
fn python_with_fhirpy() -> PathBuf {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fhir-client-venv");
    let python = venv.join("bin").join("python");
    let ready = python.exists()
        && Command::new(&python)
            .args(["-c", "import fhirpy, requests"])
            .status()
            .is_ok_and(|s| s.success());
    if !ready {
        let made = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3 runs (apt-get install python3-venv)");
        assert!(made.success(), "python3 -m venv failed");
        let installed = Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(PACKAGES)
            .status()
            .expect("pip runs");
        assert!(installed.success(), "pip install {PACKAGES:?} failed");
    }
    python
}

#[test]
fn fhirpy_creates_searches_pages_and_shares_records_only_under_consent() {
    // Goal: an unmodified FHIR client library, given only base URLs and tokens, creates a
    // patient and 25 observations at hospital-a, searches them with code and date filters
    // and pages through them by the server's links, updates one (version 2, version 1 still
    // readable); hospital-b's clinician finds nothing and is refused a read until the
    // patient (logged in with password and one-time code) creates a Consent, then finds all
    // 25 across the consortium; the patient's AuditEvents show the denials with proof
    // links; after the patient sets the Consent inactive, hospital-b finds nothing again.
    let python = python_with_fhirpy();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("demo");
    let log = std::fs::File::create(dir.path().join("demo.log")).unwrap();
    let _demo = Running(
        Command::new(env!("CARGO_BIN_EXE_medledger"))
            .args(["demo", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data)
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("the demo starts"),
    );
    let description = data.join("fhir-demo.json");
    let started = Instant::now();
    while !description.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "the demo did not come up:\n{}",
            std::fs::read_to_string(dir.path().join("demo.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The demo writes the file (replaced whole) once its own story is over: from here on
    // the script is the only one acting as dr-alice, so neither takes a nonce the other has.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fhir_client/consortium.py");
    let output = Command::new(&python)
        .arg(&script)
        .arg(&description)
        .arg(env!("CARGO_BIN_EXE_medledger"))
        .output()
        .expect("the client script runs");
    let shown = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "the FHIR client scenario failed:\n{shown}\n--- demo log ---\n{}",
        std::fs::read_to_string(dir.path().join("demo.log")).unwrap_or_default()
    );
    assert!(shown.contains("25 observations created"), "{shown}");
}

//! Azure Blob through Azurite, the Azure Storage emulator.
mod common;

use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use common::s3::spawn_for_process;
use common::*;

const ACCOUNT: &str = "devstoreaccount1";
/// Azurite's published development key.
const KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

#[test]
fn push_and_mount_azure_blob() {
    let w = Work::new();
    let port = free_port();
    let mut cmd = Command::new("azurite-blob");
    cmd.args([
        "--silent",
        "--skipApiVersionCheck",
        "--blobHost",
        "127.0.0.1",
        "--blobPort",
        &port.to_string(),
        "--location",
    ])
    .arg(w.dir.path().join("azurite"));
    spawn_for_process(
        cmd,
        std::fs::File::create(w.dir.path().join("azurite.log")).unwrap(),
    )
    .expect("azurite-blob is required (./test.sh installs it with npm)");
    wait_until("azurite to listen", Duration::from_secs(30), || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let endpoint = format!("http://127.0.0.1:{port}/{ACCOUNT}");
    let conn = format!("DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};BlobEndpoint={endpoint};");
    let made = Command::new("python3")
        .args(["-c", "import sys; from azure.storage.blob import BlobServiceClient as B; B.from_connection_string(sys.argv[1]).create_container('models')", &conn])
        .status()
        .unwrap();
    assert!(
        made.success(),
        "python azure-storage-blob is required (./test.sh installs it)"
    );

    w.synth("48MiB", 2);
    let az = |args: &[&str]| {
        Command::new(bin())
            .args(args)
            .env("AZURE_STORAGE_ACCOUNT", ACCOUNT)
            .env("AZURE_STORAGE_KEY", KEY)
            .output()
            .unwrap()
    };
    let out = az(&[
        "push",
        w.src().to_str().unwrap(),
        "azblob://models/tiny",
        "--endpoint",
        &endpoint,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let env = [
        ("AZURE_STORAGE_ACCOUNT".to_string(), ACCOUNT.to_string()),
        ("AZURE_STORAGE_KEY".to_string(), KEY.to_string()),
    ];
    let m = Mount::new(
        "azblob://models/tiny",
        &w.mnt(),
        w.cache.path(),
        &["--endpoint", &endpoint],
        &env,
    );
    let mut n = 0;
    for e in std::fs::read_dir(w.src()).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        assert_same_file(&w.src().join(&name), &m.path(&name));
        n += 1;
    }
    assert_eq!(n, 4);
    drop(m);

    // A wrong key: one line naming Azure's settings, never AWS's.
    let out = Command::new(bin())
        .args(["mount", "azblob://models/tiny", w.mnt().to_str().unwrap()])
        .args(["--endpoint", &endpoint, "--retries", "0"])
        .env("AZURE_STORAGE_ACCOUNT", ACCOUNT)
        .env("AZURE_STORAGE_KEY", KEY.replace('E', "F"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("AZURE_STORAGE_KEY"), "{err}");
    assert!(!err.contains("AWS"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

//! moto: the DynamoDB and DynamoDB Streams APIs, started once per test binary.

use super::*;

/// The endpoint, and the server this binary started (held so that it lives as long as the tests;
/// the kernel kills it when the binary exits).
static MOTO: OnceLock<(String, Option<Mutex<std::process::Child>>)> = OnceLock::new();

/// The endpoint of a DynamoDB API for tests. Panics, with what to do, when there is none.
pub fn moto_endpoint() -> String {
    MOTO.get_or_init(|| {
        if let Ok(url) = std::env::var("ROOMCAST_TEST_DYNAMODB_ENDPOINT")
            && !url.is_empty()
        {
            return (url, None);
        }
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        // moto's server through tests/moto_server.py, which makes its transactions as fast as
        // DynamoDB's (see there).
        let server = root.join(".venv/bin/python");
        let launcher = root.join("tests/moto_server.py");
        assert!(
            root.join(".venv/bin/moto_server").exists(),
            "no DynamoDB API for the tests: {} is missing. Run ./scripts/test (it installs moto into .venv) \
             or set ROOMCAST_TEST_DYNAMODB_ENDPOINT to a running moto server",
            root.join(".venv/bin/moto_server").display()
        );
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port");
        let mut command = Command::new(&server);
        command.arg(&launcher);
        command.args(["-H", "127.0.0.1", "-p", &port.to_string()]).stdout(Stdio::null()).stderr(Stdio::null());
        // The server dies with the test binary, however it ends.
        unsafe {
            use std::os::unix::process::CommandExt;
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        // PR_SET_PDEATHSIG fires when the *thread* that spawned the child ends, and each test runs
        // on a thread of its own: spawn from a thread that lives as long as the binary.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(command.spawn());
            loop {
                std::thread::park();
            }
        });
        let mut child = rx
            .recv()
            .expect("the spawning thread answers")
            .unwrap_or_else(|e| panic!("starting {}: {e}", server.display()));
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        for _ in 0..300 {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
                return (format!("http://{addr}"), Some(Mutex::new(child)));
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("moto_server exited at start with {status}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("moto_server did not listen on {addr} within 30 s");
    })
    .0
    .clone()
}

/// AWS SDK configuration for local endpoints: fixed test credentials, us-east-1.
pub async fn sdk_config() -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_credential_types::Credentials::new("test", "test", None, None, "roomcast-tests"))
        .load()
        .await
}

pub static TABLES: AtomicUsize = AtomicUsize::new(0);

/// A new table on moto, made by `roomcast`'s own `create_table`.
pub async fn moto_table() -> (DynamoStore, String) {
    let (store, arn, _) = moto_table_named().await;
    (store, arn)
}

/// [`moto_table`], and the table's name.
pub async fn moto_table_named() -> (DynamoStore, String, String) {
    let sdk = sdk_config().await;
    let endpoint = moto_endpoint();
    let client = roomcast::config::dynamodb_client(&sdk, Some(&endpoint));
    let name = format!("roomcast-{}-{}", std::process::id(), TABLES.fetch_add(1, Ordering::Relaxed));
    let info = create_table(&client, &name).await.expect("create table on moto");
    (DynamoStore::new(client, name.clone()), info.stream_arn, name)
}

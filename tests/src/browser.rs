//! Headless Chromium driven over WebDriver (Debian's `chromium` and `chromium-driver`): the
//! W3C protocol is plain JSON over HTTP, spoken here with the tests' own small HTTP client.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};

use crate::process::Supervised;
use crate::proxy::{TestDir, free_port};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";
const WAIT: Duration = Duration::from_secs(20);
/// Starting Chromium on a busy 2-core machine can take a while.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// One WebDriver call: JSON over HTTP/1.1 with `Connection: close`.
fn request(
    port: u16,
    method: &str,
    path: &str,
    _auth: Option<&str>,
    body: Option<&Value>,
) -> std::io::Result<(u16, Value)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(CALL_TIMEOUT))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    // chromedriver keeps the connection open: read the head, then exactly Content-Length.
    let mut raw = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&chunk[..n]);
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if raw.len() >= end + 4 + length {
                break;
            }
        }
    }
    let resp = crate::client::parse_response(&raw);
    let json = serde_json::from_slice(&resp.body).unwrap_or(Value::Null);
    Ok((resp.status, json))
}

/// One browser at a time: three Chromiums on two cores time each other out.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub struct Browser {
    _turn: std::sync::MutexGuard<'static, ()>,
    driver: Supervised,
    port: u16,
    session: String,
}

impl Browser {
    /// A fresh headless browser that resolves `*.<domain>` to 127.0.0.1. `None` (reason printed)
    /// when Chromium is not installed; in CI that fails.
    pub fn start(dir: &TestDir, domain: &str) -> Option<Browser> {
        if !Path::new(CHROMIUM).exists() || !Path::new(CHROMEDRIVER).exists() {
            assert!(
                std::env::var_os("CI").is_none(),
                "chromium and chromium-driver are missing in CI: run the tests through `cargo xtask test`"
            );
            eprintln!(
                "skipping: chromium or chromedriver is not installed (`cargo xtask test` installs them)"
            );
            return None;
        }
        let turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        let port = free_port();
        // Its own process group, which the Chromium it starts inherits: dropping the browser
        // ends the whole group by its id, so no Chromium outlives a failed test.
        let driver = Supervised::spawn(
            Command::new(CHROMEDRIVER)
                .arg(format!("--port={port}"))
                .process_group(0),
            "chromedriver",
            dir.0.join("chromedriver.log"),
        );
        let deadline = Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        let profile: PathBuf = dir.0.join(format!("chromium-profile-{port}"));
        let args = [
            "--headless=new".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--disable-dev-shm-usage".into(),
            "--disable-crash-reporter".into(),
            "--disable-breakpad".into(),
            format!("--user-data-dir={}", profile.display()),
            "--window-size=1024,768".into(),
            // Loopback only: the test's names go to 127.0.0.1 and every other name resolves to
            // nothing (pages such as oidc-provider's import web fonts), and its per-test CA is
            // not in Chromium's store, so certificate errors are ignored for this throwaway
            // profile.
            format!(
                "--host-resolver-rules=MAP *.{domain} 127.0.0.1, MAP * ~NOTFOUND, \
                 EXCLUDE 127.0.0.1, EXCLUDE localhost"
            ),
            "--ignore-certificate-errors".into(),
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
        }}});
        let (status, v) =
            request(port, "POST", "/session", None, Some(&caps)).expect("new session");
        assert_eq!(
            status,
            200,
            "chromedriver refused the session: {v}\n{}",
            driver.log_text()
        );
        let session = v["value"]["sessionId"]
            .as_str()
            .expect("session id")
            .to_string();
        Some(Browser {
            _turn: turn,
            driver,
            port,
            session,
        })
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let path = format!("/session/{}{path}", self.session);
        let (status, v) =
            request(self.port, method, &path, None, body.as_ref()).expect("WebDriver call");
        assert_eq!(status, 200, "{method} {path}: {v}");
        v["value"].clone()
    }

    pub fn goto(&self, url: &str) {
        self.call("POST", "/url", Some(json!({"url": url})));
    }

    /// `goto` that returns WebDriver's error (e.g. `net::ERR_NAME_NOT_RESOLVED`) instead of
    /// failing.
    pub fn try_goto(&self, url: &str) -> Result<(), Value> {
        let path = format!("/session/{}/url", self.session);
        let (status, v) = request(self.port, "POST", &path, None, Some(&json!({"url": url})))
            .expect("WebDriver call");
        if status == 200 { Ok(()) } else { Err(v) }
    }

    pub fn url(&self) -> String {
        self.call("GET", "/url", None)
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    pub fn source(&self) -> String {
        self.call("GET", "/source", None)
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    fn element(&self, css: &str) -> String {
        let v = self.call(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        );
        v[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {v}"))
            .to_string()
    }

    pub fn type_into(&self, css: &str, text: &str) {
        let id = self.element(css);
        self.call(
            "POST",
            &format!("/element/{id}/value"),
            Some(json!({"text": text})),
        );
    }

    pub fn click(&self, css: &str) {
        let id = self.element(css);
        self.call("POST", &format!("/element/{id}/click"), Some(json!({})));
    }

    /// Whether the page has an element matching `css` now.
    pub fn has(&self, css: &str) -> bool {
        let v = self.call(
            "POST",
            "/elements",
            Some(json!({"using": "css selector", "value": css})),
        );
        v.as_array().is_some_and(|a| !a.is_empty())
    }

    /// Runs `script` (a function body; `return` gives the result) in the page.
    pub fn execute(&self, script: &str) -> Value {
        self.call(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
    }

    /// The page's text as a person sees it (`document.body.innerText`): for a JSON response,
    /// the JSON.
    pub fn text(&self) -> String {
        self.execute("return document.body ? document.body.innerText : '';")
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The HTTP status of the page's document (Navigation Timing's `responseStatus`).
    pub fn status(&self) -> Option<u16> {
        self.execute(
            "const n = performance.getEntriesByType('navigation')[0]; \
             return n ? n.responseStatus : null;",
        )
        .as_u64()
        .and_then(|s| u16::try_from(s).ok())
    }

    /// Saves a PNG of the page; returns its size in bytes.
    pub fn screenshot(&self, path: &Path) -> usize {
        let b64 = self.call("GET", "/screenshot", None);
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().unwrap_or_default())
            .expect("screenshot is base64");
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("screenshot dir");
        }
        std::fs::write(path, &png).expect("write screenshot");
        png.len()
    }

    /// Polls the page (≤ 20 s) until `f` holds for its source.
    pub fn wait_for(&self, what: &str, f: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let src = self.source();
            if f(&src) {
                return src;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not seen at {}:\n{src}",
                self.url()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ends Chromium; the driver itself is stopped by its guard.
        let _ = request(
            self.port,
            "DELETE",
            &format!("/session/{}", self.session),
            None,
            None,
        );
        let _ = self.driver.terminate(Duration::from_secs(5));
        // Whatever is left of Chromium (the session did not end cleanly): the driver's group.
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.driver.pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

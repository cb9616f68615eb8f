//! A real headless Chromium (Debian's `chromium` and `chromium-driver`) driven over the W3C
//! WebDriver protocol: a fresh profile per browser, nothing from outside loopback.

use serde_json::{json, Value};
use std::time::Duration;

pub struct Browser {
    client: reqwest::Client,
    session: String,
    driver: std::process::Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    pub async fn start() -> Browser {
        let client = amplog_providers::connector::http_client().build().unwrap();
        let driver = std::env::var("AMPLOG_TEST_CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = std::process::Command::new(&driver)
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{driver} (Debian's chromium-driver; scripts/test installs it): {e}"));
        let base = format!("http://127.0.0.1:{port}");
        for _ in 0..100 {
            if client.get(format!("{base}/status")).send().await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile = tempfile::tempdir().unwrap();
        let mut options = json!({"args": [
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
            "--disable-dev-shm-usage", "--window-size=900,900", format!("--user-data-dir={}", profile.path().display()),
        ]});
        if let Ok(binary) = std::env::var("AMPLOG_TEST_CHROMIUM") {
            options["binary"] = json!(binary);
        }
        let capabilities =
            json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options}}});
        let created = command(&client, reqwest::Method::POST, &format!("{base}/session"), capabilities).await;
        let session = format!("{base}/session/{}", created["sessionId"].as_str().unwrap());
        Browser { client, session, driver: child, _profile: profile }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        command(&self.client, method, &format!("{}{path}", self.session), body).await
    }

    pub async fn goto(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", json!({"url": url})).await;
    }

    pub async fn url(&self) -> String {
        self.call(reqwest::Method::GET, "/url", Value::Null).await.as_str().unwrap_or_default().to_string()
    }

    /// Runs `script` (a function body) in the page and returns its value.
    pub async fn eval(&self, script: &str) -> Value {
        self.call(reqwest::Method::POST, "/execute/sync", json!({"script": script, "args": []})).await
    }

    /// The page's text.
    pub async fn text(&self) -> String {
        self.eval("return document.body ? document.body.innerText : ''").await.as_str().unwrap_or_default().to_string()
    }

    /// Waits (bounded) until `condition` (a JavaScript expression) holds in the page.
    pub async fn wait_for(&self, condition: &str) {
        for _ in 0..200 {
            if self.eval(&format!("try {{ return !!({condition}); }} catch (e) {{ return false; }}")).await
                == json!(true)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{condition} never held; at {}: {}", self.url().await, self.text().await);
    }

    /// Clicks the element `css` once it is there.
    pub async fn click(&self, css: &str) {
        self.wait_for(&format!("document.querySelector({css:?})")).await;
        self.eval(&format!("document.querySelector({css:?}).click(); return true")).await;
    }

    /// Saves a PNG of the page when `AMPLOG_TEST_SCREENSHOTS` names a folder (how the
    /// pictures in docs/connect.md are made).
    pub async fn screenshot(&self, name: &str) {
        let Ok(dir) = std::env::var("AMPLOG_TEST_SCREENSHOTS") else { return };
        use base64::Engine;
        let png = self.call(reqwest::Method::GET, "/screenshot", Value::Null).await;
        let bytes = base64::engine::general_purpose::STANDARD.decode(png.as_str().unwrap()).unwrap();
        std::fs::write(std::path::Path::new(&dir).join(format!("{name}.png")), bytes).unwrap();
    }

    pub async fn quit(mut self) {
        self.call(reqwest::Method::DELETE, "", json!({})).await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// A WebDriver command; returns its `value`.
pub async fn command(client: &reqwest::Client, method: reqwest::Method, url: &str, body: Value) -> Value {
    let request = client.request(method.clone(), url);
    let request = if method == reqwest::Method::GET { request } else { request.json(&body) };
    let response = request.send().await.expect("chromedriver answers");
    let value: Value = response.json().await.expect("a WebDriver answer");
    assert!(value["value"].get("error").is_none(), "{url}: {value}");
    value["value"].clone()
}

//! The pages of the authentication gate: sign-in, access denied, too many attempts. Plain HTML
//! with inline styles: no scripts, no external assets, usable with a keyboard and a screen
//! reader, and every interpolated value escaped.

use std::fmt::Write;

/// What the sign-in page offers.
pub struct LoginPage<'a> {
    pub domain: &'a str,
    pub password: bool,
    pub pin: bool,
    /// Link that starts single sign-on, when enabled.
    pub sso_url: Option<&'a str>,
    pub error: Option<&'a str>,
    /// The CSRF nonce repeated in each form.
    pub csrf: &'a str,
    /// The local path to go back to after signing in.
    pub return_to: &'a str,
    /// Where the forms post.
    pub action: &'a str,
}

const STYLE: &str = "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;background:#f4f5f7;\
color:#1d2129;margin:0;padding:1rem}main{max-width:24rem;margin:8vh auto;background:#fff;\
border-radius:.75rem;padding:2rem;box-shadow:0 1px 4px rgba(0,0,0,.12)}h1{font-size:1.4rem;\
margin:0 0 .25rem}p.sub{color:#5a6170;margin:0 0 1.5rem;word-break:break-all}form{margin:0 0 1.25rem}\
label{display:block;font-weight:600;margin:0 0 .35rem}input{box-sizing:border-box;width:100%;\
font-size:1rem;padding:.6rem .7rem;border:1px solid #9aa1ad;border-radius:.4rem}\
button,a.button{display:block;box-sizing:border-box;width:100%;margin-top:.6rem;padding:.65rem;\
font-size:1rem;font-weight:600;text-align:center;text-decoration:none;border:0;border-radius:.4rem;\
background:#1f5fbf;color:#fff;cursor:pointer}a.button{background:#2b2f36}\
:focus-visible{outline:3px solid #f0a202;outline-offset:2px}\
.alert{background:#fdecea;color:#8a1c12;border-radius:.4rem;padding:.6rem .8rem;margin:0 0 1rem}\
hr{border:0;border-top:1px solid #e3e5e8;margin:1.25rem 0}";

fn document(title: &str, body: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <meta name=\"robots\" content=\"noindex\"><title>{}</title><style>{STYLE}</style></head>\
         <body><main>{body}</main></body></html>\n",
        escape(title)
    )
}

pub fn render(page: &LoginPage<'_>) -> String {
    let mut body = String::new();
    let _ = write!(
        body,
        "<h1>Sign in</h1><p class=\"sub\">to continue to {}</p>",
        escape(page.domain)
    );
    if let Some(error) = page.error {
        let _ = write!(
            body,
            "<p class=\"alert\" role=\"alert\">{}</p>",
            escape(error)
        );
    }
    let mut first = true;
    let mut separator = |body: &mut String| {
        if !first {
            body.push_str("<hr>");
        }
        first = false;
    };
    if let Some(url) = page.sso_url {
        separator(&mut body);
        let _ = write!(
            body,
            "<a class=\"button\" id=\"sso\" href=\"{}\">Sign in with single sign-on</a>",
            escape(url)
        );
    }
    for (enabled, method, label, input) in [
        (
            page.password,
            "password",
            "Password",
            "type=\"password\" autocomplete=\"current-password\"",
        ),
        (
            page.pin,
            "pin",
            "PIN",
            "type=\"password\" inputmode=\"numeric\" autocomplete=\"one-time-code\" pattern=\"[0-9]*\"",
        ),
    ] {
        if !enabled {
            continue;
        }
        separator(&mut body);
        let _ = write!(
            body,
            "<form method=\"post\" action=\"{action}\" data-method=\"{method}\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
             <input type=\"hidden\" name=\"return_to\" value=\"{ret}\">\
             <input type=\"hidden\" name=\"method\" value=\"{method}\">\
             <label for=\"{method}\">{label}</label>\
             <input id=\"{method}\" name=\"{method}\" {input} required>\
             <button type=\"submit\">Sign in with {label}</button></form>",
            action = escape(page.action),
            csrf = escape(page.csrf),
            ret = escape(page.return_to),
        );
    }
    document("Sign in", &body)
}

pub fn denied_page(domain: &str, reason: &str) -> String {
    document(
        "Access denied",
        &format!(
            "<h1>Access denied</h1><p class=\"sub\">{}</p><p role=\"alert\">{}</p>",
            escape(domain),
            escape(reason)
        ),
    )
}

pub fn locked_page(retry_after_secs: u64) -> String {
    document(
        "Too many attempts",
        &format!(
            "<h1>Too many attempts</h1><p role=\"alert\">Too many failed sign-in attempts. \
             Please retry in {retry_after_secs} seconds.</p>"
        ),
    )
}

/// HTML-escapes text for element content and double-quoted attributes.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page<'a>(error: Option<&'a str>, return_to: &'a str) -> LoginPage<'a> {
        LoginPage {
            domain: "app.example.com",
            password: true,
            pin: true,
            sso_url: Some("/__portcullis__/sso?return_to=%2F"),
            error,
            csrf: "nonce123",
            return_to,
            action: "/__portcullis__/login",
        }
    }

    #[test]
    fn offers_every_enabled_method_without_scripts_or_assets() {
        let html = render(&page(None, "/x"));
        for needle in [
            "name=\"password\"",
            "name=\"pin\"",
            "inputmode=\"numeric\"",
            "id=\"sso\"",
            "value=\"nonce123\"",
            "<label for=\"pin\">",
        ] {
            assert!(html.contains(needle), "{needle}");
        }
        assert!(!html.contains("<script") && !html.contains("http"));
        let only_pin = render(&LoginPage {
            password: false,
            sso_url: None,
            ..page(None, "/")
        });
        assert!(!only_pin.contains("name=\"password\"") && !only_pin.contains("sso"));
    }

    #[test]
    fn everything_interpolated_is_escaped() {
        let html = render(&page(Some("<script>alert(1)</script>"), "/\"><script>"));
        assert!(!html.contains("<script>"));
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(html.contains("role=\"alert\""));
        assert_eq!(escape("a&'\""), "a&amp;&#39;&quot;");
        assert!(denied_page("<d>", "<r>").contains("&lt;r&gt;"));
        assert!(locked_page(30).contains("30 seconds"));
    }
}

//! Building blocks of the authentication gate (`http::gate`): the login page, form parsing,
//! CSRF protection, cookies, the brute-force lockout, and the access-log pipeline.

pub mod access_log;
pub mod cookies;
pub mod csrf;
pub mod form;
pub mod lockout;
pub mod login_page;
pub mod session_cache;
pub mod tunnel_peer;

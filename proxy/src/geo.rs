//! Country lookup for access restrictions, from a GeoLite2-format (MaxMind DB) file in
//! `NB_PROXY_GEO_DATA_DIR`. Loaded once at start, read in full into memory (no mmap); without
//! it, services with country rules are refused (never served unrestricted). NetBird's proxy
//! keeps `GeoLite2-City_<date>.mmdb` there (and downloads one when missing, which we do not); a
//! Country database of the same format is enough and preferred.
//!
//! One process-wide, write-once handle rather than a field of `Shared`: access policies are
//! built by the route table code and checked on every worker, neither of which holds `Shared`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

#[derive(Debug, thiserror::Error)]
pub enum GeoError {
    #[error("cannot read {path}: {message}")]
    Open { path: String, message: String },
}

pub struct Geo {
    reader: maxminddb::Reader<Vec<u8>>,
    pub path: PathBuf,
}

static GEO: OnceLock<Geo> = OnceLock::new();
/// The directory `install` looked in, for error messages.
static DATA_DIR: OnceLock<PathBuf> = OnceLock::new();

/// The database, when one was loaded.
pub fn database() -> Option<&'static Geo> {
    GEO.get()
}

/// Loads the database of `dir` for the whole process; `Ok(false)` when the directory holds none.
pub fn install(dir: &Path) -> Result<bool, GeoError> {
    let _ = DATA_DIR.set(dir.to_path_buf());
    let Some(path) = find_database(dir) else {
        return Ok(false);
    };
    let geo = Geo::open(&path)?;
    let _ = GEO.set(geo);
    Ok(true)
}

/// The directory searched for the database, once `install` ran.
pub fn data_dir() -> Option<&'static Path> {
    DATA_DIR.get().map(PathBuf::as_path)
}

/// A `*Country*.mmdb` first, then a `*City*` one (NetBird's `GeoLite2-City_<date>.mmdb`), then
/// any `.mmdb`; among several of a kind the greatest name, so the newest dated one.
fn find_database(dir: &Path) -> Option<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "mmdb"))
        .collect();
    files.sort_by_key(|p| {
        let name = p.file_name().map(|n| n.to_string_lossy().to_string());
        let name = name.unwrap_or_default();
        (
            !name.contains("Country"),
            !name.contains("City"),
            std::cmp::Reverse(name),
        )
    });
    files.into_iter().next()
}

impl Geo {
    pub fn open(path: &Path) -> Result<Self, GeoError> {
        let reader = maxminddb::Reader::open_readfile(path).map_err(|e| GeoError::Open {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let kind = reader.metadata.database_type.to_ascii_lowercase();
        if !["country", "city", "enterprise"]
            .iter()
            .any(|k| kind.contains(k))
        {
            tracing::warn!(
                path = %path.display(),
                database_type = %reader.metadata.database_type,
                "this database may hold no countries; expected a GeoLite2/GeoIP2 Country or City one"
            );
        }
        Ok(Self {
            reader,
            path: path.to_path_buf(),
        })
    }

    /// The ISO 3166-1 alpha-2 code of the country `ip` is in (else its registered country).
    pub fn country(&self, ip: IpAddr) -> Option<[u8; 2]> {
        let found = self.reader.lookup(ip).ok()?;
        let rec: maxminddb::geoip2::Country = found.decode().ok()??;
        let code = rec.country.iso_code.or(rec.registered_country.iso_code)?;
        let b = code.as_bytes();
        (b.len() == 2).then(|| [b[0].to_ascii_uppercase(), b[1].to_ascii_uppercase()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn fixture() -> Geo {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/geo-test.mmdb");
        Geo::open(&path).unwrap()
    }

    #[test]
    fn looks_up_countries() {
        let g = fixture();
        assert_eq!(g.country("203.0.113.9".parse().unwrap()), Some(*b"DE"));
        assert_eq!(g.country("198.51.100.1".parse().unwrap()), Some(*b"US"));
        assert_eq!(g.country("2001:db8::1".parse().unwrap()), Some(*b"FR"));
        assert_eq!(g.country("127.0.0.2".parse().unwrap()), Some(*b"DE"));
        assert_eq!(g.country("10.0.0.1".parse().unwrap()), None);
        // Only a registered country: that one; a record without any country: none.
        assert_eq!(g.country("198.18.0.7".parse().unwrap()), Some(*b"JP"));
        assert_eq!(g.country("198.18.1.7".parse().unwrap()), None);
        assert_eq!(g.country("2001:db9::1".parse().unwrap()), None);
    }

    #[test]
    fn finds_the_database_in_a_directory() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        assert!(find_database(&dir).is_some());
        assert!(find_database(Path::new("/nonexistent")).is_none());

        let tmp = std::env::temp_dir().join(format!("portcullis-geo-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        let touch = |name: &str| std::fs::write(tmp.join(name), b"").unwrap();
        touch("notes.txt");
        assert_eq!(find_database(&tmp), None);
        touch("other.mmdb");
        touch("GeoLite2-City_20240101.mmdb");
        touch("GeoLite2-City_20250301.mmdb");
        let name = |p: Option<PathBuf>| p.unwrap().file_name().unwrap().to_owned();
        assert_eq!(name(find_database(&tmp)), "GeoLite2-City_20250301.mmdb");
        touch("GeoLite2-Country.mmdb");
        assert_eq!(name(find_database(&tmp)), "GeoLite2-Country.mmdb");
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}

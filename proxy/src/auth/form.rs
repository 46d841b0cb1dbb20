//! `application/x-www-form-urlencoded` bodies (and query strings), bounded in size and fields.

/// Largest body parsed.
pub const MAX_BYTES: usize = 8 * 1024;
/// Most fields kept.
pub const MAX_FIELDS: usize = 16;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormError {
    #[error("form is larger than {MAX_BYTES} bytes")]
    TooLarge,
    #[error("form has more than {MAX_FIELDS} fields")]
    TooManyFields,
    #[error("form is not valid UTF-8 after decoding")]
    Encoding,
}

#[derive(Debug, Default)]
pub struct Form {
    fields: Vec<(String, String)>,
}

impl Form {
    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

pub fn parse(body: &[u8]) -> Result<Form, FormError> {
    if body.len() > MAX_BYTES {
        return Err(FormError::TooLarge);
    }
    let mut fields = Vec::new();
    for pair in body.split(|b| *b == b'&').filter(|p| !p.is_empty()) {
        if fields.len() == MAX_FIELDS {
            return Err(FormError::TooManyFields);
        }
        let (k, v) = match pair.iter().position(|b| *b == b'=') {
            Some(i) => (&pair[..i], &pair[i + 1..]),
            None => (pair, &[][..]),
        };
        fields.push((decode(k)?, decode(v)?));
    }
    Ok(Form { fields })
}

fn decode(raw: &[u8]) -> Result<String, FormError> {
    let plus_as_space: Vec<u8> = raw
        .iter()
        .map(|b| if *b == b'+' { b' ' } else { *b })
        .collect();
    percent_encoding::percent_decode(&plus_as_space)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| FormError::Encoding)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_fields() {
        let f = parse(b"method=pin&pin=12%2034&x=a+b&empty=&flag").unwrap();
        assert_eq!(f.get("pin"), Some("12 34"));
        assert_eq!(f.get("x"), Some("a b"));
        assert_eq!(f.get("empty"), Some(""));
        assert_eq!(f.get("flag"), Some(""));
        assert_eq!(f.get("missing"), None);
    }

    #[test]
    fn bounded_and_strict() {
        assert_eq!(
            parse(&[b'a'; MAX_BYTES + 1]).unwrap_err(),
            FormError::TooLarge
        );
        let many = vec!["a=1"; MAX_FIELDS + 1].join("&");
        assert_eq!(
            parse(many.as_bytes()).unwrap_err(),
            FormError::TooManyFields
        );
        assert_eq!(parse(b"a=%ff").unwrap_err(), FormError::Encoding);
    }
}

//! Email templates: files on disk, rendered with minijinja.
//!
//! Why this module exists: wording and layout of emails change far more often than
//! the code that sends them, and must be editable without touching Rust. Each kind
//! of email has three templates in the template folder:
//!
//! ```text
//! <kind>/subject.txt   one line (whitespace is collapsed, at most 200 characters)
//! <kind>/body.txt      the text/plain part
//! <kind>/body.html     the text/html part (may extend layout.html)
//! ```
//!
//! with `kind` one of `chat_digest`, `purchase`, `payment_reminder`, `shipping`.
//! A translated set lives in `<locale>/<kind>/...` (`de/purchase/subject.txt`); for a
//! user with locale `de-AT` the lookup tries `de-AT/`, then `de/`, then the default,
//! file by file.
//!
//! Escaping follows the file name: `.html` templates are HTML-autoescaped (a chat
//! message `<script>` becomes `&lt;script&gt;`), `.txt` templates are not escaped at
//! all (a text part shows exactly what was written). Undefined variables are errors,
//! so a typo in a template fails at start-up (every template is rendered once with a
//! sample context) instead of producing an email with a hole in it. Templates are
//! re-read when their file changes.

use std::path::{Path, PathBuf};

use minijinja::syntax::SyntaxConfig;
use minijinja::value::Serde;
use minijinja::{path_loader, Environment, ErrorKind, UndefinedBehavior};
use serde::Serialize;

/// The kinds of email there are templates for.
pub const KINDS: [&str; 4] = ["chat_digest", "purchase", "payment_reminder", "shipping"];

/// The three parts of one email.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub subject: String,
    pub text: String,
    pub html: String,
}

/// Why an email could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("template {name}: {message}")]
    Render { name: String, message: String },
    #[error("template {name} renders an empty subject")]
    EmptySubject { name: String },
}

/// The loaded template folder.
pub struct Templates {
    env: Environment<'static>,
    dir: PathBuf,
}

impl std::fmt::Debug for Templates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Templates").field("dir", &self.dir).finish_non_exhaustive()
    }
}

impl Templates {
    /// Loads templates from `dir`. Nothing is read yet; call [`Templates::validate`].
    pub fn new(dir: &Path) -> Result<Self, String> {
        let mut env = Environment::new();
        env.set_loader(path_loader(dir));
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|err| format!("template syntax: {err}"))?;
        env.set_syntax(syntax);
        Ok(Self { env, dir: dir.to_owned() })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Renders every kind once with its sample context, so a missing file, a syntax
    /// error or an undefined variable stops the service at start.
    pub fn validate(&self) -> Result<(), TemplateError> {
        for kind in KINDS {
            self.render(kind, None, &crate::compose::sample_context(kind))?;
        }
        Ok(())
    }

    /// Renders `kind` for a reader with `locale`.
    pub fn render<C: Serialize>(
        &self,
        kind: &str,
        locale: Option<&str>,
        context: &C,
    ) -> Result<Rendered, TemplateError> {
        let subject_name = self.pick(kind, locale, "subject.txt");
        let subject: String = self.render_one(&subject_name, context)?.split_whitespace().collect::<Vec<_>>().join(" ");
        if subject.is_empty() {
            return Err(TemplateError::EmptySubject { name: subject_name });
        }
        let subject = subject.chars().take(200).collect();
        let text = self.render_one(&self.pick(kind, locale, "body.txt"), context)?;
        let html = self.render_one(&self.pick(kind, locale, "body.html"), context)?;
        Ok(Rendered { subject, text, html })
    }

    /// The most specific template name for `part` that exists.
    fn pick(&self, kind: &str, locale: Option<&str>, part: &str) -> String {
        let mut candidates = Vec::new();
        if let Some(locale) = locale {
            candidates.push(format!("{locale}/{kind}/{part}"));
            if let Some((language, _)) = locale.split_once('-') {
                candidates.push(format!("{language}/{kind}/{part}"));
            }
        }
        let default = format!("{kind}/{part}");
        for name in candidates {
            match self.env.get_template(&name) {
                Ok(_) => return name,
                Err(err) if err.kind() == ErrorKind::TemplateNotFound => {}
                // A broken translation: use it anyway so the error surfaces.
                Err(_) => return name,
            }
        }
        default
    }

    fn render_one<C: Serialize>(&self, name: &str, context: &C) -> Result<String, TemplateError> {
        let failed = |err: minijinja::Error| TemplateError::Render { name: name.to_owned(), message: describe(&err) };
        let template = self.env.get_template(name).map_err(failed)?;
        template.render(Serde(context)).map_err(failed)
    }
}

/// The error with its causes and, where known, the line.
fn describe(err: &minijinja::Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn shipped() -> Templates {
        let dir = crate::settings::EmailSettings::default().resolve_templates_dir().expect("templates");
        Templates::new(&dir).expect("environment")
    }

    #[test]
    fn the_shipped_templates_are_valid() {
        shipped().validate().expect("every kind renders its sample");
    }

    #[test]
    fn html_is_escaped_and_text_is_not() {
        let templates = shipped();
        let mut context = crate::compose::sample_context("chat_digest");
        context["senders"][0]["messages"][0]["content"] = json!("<script>alert(1)</script> & \"quotes\"");
        context["senders"][0]["display_name"] = json!("<b>Mallory</b>");
        let rendered = templates.render("chat_digest", None, &context).expect("renders");
        assert!(rendered.text.contains("<script>alert(1)</script> & \"quotes\""), "{}", rendered.text);
        assert!(rendered.html.contains("&lt;script&gt;alert(1)&lt;&#x2f;script&gt;"), "{}", rendered.html);
        assert!(!rendered.html.to_lowercase().contains("<script"), "{}", rendered.html);
        assert!(!rendered.html.contains("<b>Mallory"), "{}", rendered.html);
        assert!(!rendered.subject.contains('\n'));
    }

    #[test]
    fn locales_fall_back_file_by_file_and_errors_name_the_template() {
        let dir = testkit::scratch("templates");
        for kind in KINDS {
            std::fs::create_dir_all(dir.join(kind)).expect("dir");
            std::fs::write(dir.join(kind).join("subject.txt"), "Hello {{ recipient.display_name }}").expect("write");
            std::fs::write(dir.join(kind).join("body.txt"), "text").expect("write");
            std::fs::write(dir.join(kind).join("body.html"), "<p>{{ recipient.display_name }}</p>").expect("write");
        }
        std::fs::create_dir_all(dir.join("de/purchase")).expect("dir");
        std::fs::write(dir.join("de/purchase/subject.txt"), "Hallo {{ recipient.display_name }}").expect("write");
        let templates = Templates::new(&dir).expect("environment");
        templates.validate().expect("valid");
        let context = crate::compose::sample_context("purchase");
        assert_eq!(templates.render("purchase", Some("de-AT"), &context).expect("de").subject, "Hallo Sam Sample");
        assert_eq!(templates.render("purchase", Some("fr"), &context).expect("fr").subject, "Hello Sam Sample");
        assert_eq!(templates.render("purchase", Some("de"), &context).expect("de").text, "text");

        std::fs::write(dir.join("shipping/body.txt"), "{{ no_such_variable }}").expect("write");
        let err = templates.validate().expect_err("undefined variable");
        assert!(err.to_string().contains("shipping/body.txt"), "{err}");
    }
}

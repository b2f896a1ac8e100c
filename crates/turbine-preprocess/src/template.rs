//! Rendering a model's Jinja chat template the way Hugging Face transformers does.
//!
//! Same environment settings as transformers' `apply_chat_template` (`trim_blocks`,
//! `lstrip_blocks`, no trailing newline kept), Python string methods through
//! `minijinja-contrib`'s pycompat, the globals `raise_exception` and `strftime_now`, and a
//! `tojson` filter that writes JSON as Python's `json.dumps` does.

use std::fmt::Write as _;

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, ErrorKind};
use serde_json::Value as Json;

use crate::Error;

const TEMPLATE_NAME: &str = "chat";

/// A compiled chat template with the special tokens it may refer to.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl ChatTemplate {
    /// Compiles `source`; `bos_token` and `eos_token` are passed to every render.
    pub fn new(source: String, bos_token: Option<String>, eos_token: Option<String>) -> Result<Self, Error> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source)
            .map_err(Error::TemplateSyntax)?;
        Ok(Self {
            env,
            bos_token,
            eos_token,
        })
    }

    /// Renders the prompt for `messages`.
    ///
    /// Each message is passed to the template as given (`role`, `content`, and any other field
    /// such as `name` or `tool_calls`), except that OpenAI content parts made only of text
    /// (`[{"type": "text", "text": "..."}]`) are joined with newlines into one string, as vLLM
    /// does, because most templates concatenate `content` as a string. Content with other parts
    /// (images) is passed on as the list. `tools` is `none` in the template when absent.
    pub fn render(
        &self,
        messages: &[Json],
        tools: Option<&[Json]>,
        add_generation_prompt: bool,
    ) -> Result<String, Error> {
        let messages: Vec<Json> = messages.iter().map(flatten_text_parts).collect();
        let ctx = minijinja::context! {
            messages => Value::from_serialize(&messages),
            tools => tools.map(Value::from_serialize),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_deref().unwrap_or(""),
            eos_token => self.eos_token.as_deref().unwrap_or(""),
        };
        let template = self.env.get_template(TEMPLATE_NAME).map_err(Error::TemplateRender)?;
        template.render(ctx).map_err(Error::TemplateRender)
    }
}

/// `message` with text-only content parts joined into a string.
fn flatten_text_parts(message: &Json) -> Json {
    let Some(Json::Array(parts)) = message.get("content") else {
        return message.clone();
    };
    let texts: Option<Vec<&str>> = parts
        .iter()
        .map(|p| {
            match (
                p.get("type").and_then(Json::as_str),
                p.get("text").and_then(Json::as_str),
            ) {
                (Some("text"), Some(text)) => Some(text),
                _ => None,
            }
        })
        .collect();
    let mut message = message.clone();
    if let (Some(texts), Some(obj)) = (texts, message.as_object_mut()) {
        obj.insert("content".to_owned(), Json::String(texts.join("\n")));
    }
    message
}

fn raise_exception(msg: String) -> Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(
        ErrorKind::InvalidOperation,
        format!("chat template raised an exception: {msg}"),
    ))
}

fn strftime_now(format: String) -> Result<Value, minijinja::Error> {
    let mut out = String::new();
    // chrono reports a bad format as a fmt::Error while writing; to_string() would panic.
    write!(out, "{}", chrono::Local::now().format(&format)).map_err(|_| {
        minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: invalid format {format:?}"),
        )
    })?;
    Ok(Value::from(out))
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False, indent=indent)`,
/// so `", "` and `": "` separators and no HTML escaping (minijinja's own escapes `<`).
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value)
        .map_err(|e| minijinja::Error::new(ErrorKind::BadSerialization, "tojson: value is not JSON").with_source(e))?;
    let mut out = String::new();
    write_python_json(&mut out, &json, indent, 0);
    Ok(Value::from_safe_string(out))
}

fn write_python_json(out: &mut String, v: &Json, indent: Option<usize>, level: usize) {
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', n * level));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        Json::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                write_python_json(out, item, indent, level + 1);
            }
            newline(out, level);
            out.push(']');
        }
        Json::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                out.push_str(&Json::String(k.clone()).to_string());
                out.push_str(": ");
                write_python_json(out, item, indent, level + 1);
            }
            newline(out, level);
            out.push('}');
        }
        // Scalars and empty containers print the same in both languages.
        _ => out.push_str(&v.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render(source: &str, messages: Json) -> Result<String, Error> {
        let t = ChatTemplate::new(source.to_owned(), Some("<s>".into()), Some("</s>".into()))?;
        t.render(messages.as_array().unwrap(), None, true)
    }

    #[test]
    fn python_string_methods_and_tokens() {
        let out = render(
            "{{ bos_token }}{% for m in messages %}{{ m.content.strip().upper() }}{% if m.content.startswith(' h') %}!{% endif %}{% endfor %}{{ eos_token }}",
            json!([{"role": "user", "content": " hi "}]),
        )
        .unwrap();
        assert_eq!(out, "<s>HI!</s>");
    }

    #[test]
    fn raise_exception_is_a_render_error() {
        let err = render("{{ raise_exception('only user and assistant') }}", json!([])).unwrap_err();
        let chain = format!("{:#}", anyhow::Error::from(err));
        assert!(chain.contains("only user and assistant"), "{chain}");
    }

    #[test]
    fn syntax_errors_are_reported_at_load() {
        let err = ChatTemplate::new("{% for %}".into(), None, None).unwrap_err();
        assert!(matches!(err, Error::TemplateSyntax(_)));
    }

    #[test]
    fn text_parts_are_flattened_and_extra_fields_kept() {
        let out = render(
            "{% for m in messages %}{{ m.name }}={{ m.content }};{% endfor %}",
            json!([{"role": "user", "name": "ann", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]),
        )
        .unwrap();
        assert_eq!(out, "ann=a\nb;");
        let out = render(
            "{% for m in messages %}{{ m.content | length }}{% endfor %}",
            json!([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {}}]}]),
        )
        .unwrap();
        assert_eq!(out, "2");
    }

    #[test]
    fn tojson_matches_python() {
        let out = render(
            "{{ messages[0] | tojson }}|{{ messages[0] | tojson(indent=2) }}",
            json!([{"a": [1, "x<y"], "b": {}, "c": "é"}]),
        )
        .unwrap();
        assert_eq!(
            out,
            "{\"a\": [1, \"x<y\"], \"b\": {}, \"c\": \"é\"}|{\n  \"a\": [\n    1,\n    \"x<y\"\n  ],\n  \"b\": {},\n  \"c\": \"é\"\n}"
        );
    }

    #[test]
    fn strftime_now_formats_the_date() {
        let out = render("{{ strftime_now('%Y') }}", json!([])).unwrap();
        assert_eq!(out.len(), 4);
        assert!(out.chars().all(|c| c.is_ascii_digit()), "{out}");
    }

    #[test]
    fn whitespace_control_matches_transformers() {
        let src = "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}\n";
        assert_eq!(render(src, json!([{"role": "user", "content": "x"}])).unwrap(), "[x]\n");
    }
}

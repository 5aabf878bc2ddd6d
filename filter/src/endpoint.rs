//! The OpenAI endpoints the gateway serves and the JAiRouter service type each belongs to.

/// A JAiRouter service type: the keys under `model.services`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ServiceType {
    Chat,
    Embedding,
    Rerank,
    Tts,
    Stt,
    ImgGen,
    ImgEdit,
}

impl ServiceType {
    pub const ALL: [ServiceType; 7] = [
        ServiceType::Chat,
        ServiceType::Embedding,
        ServiceType::Rerank,
        ServiceType::Tts,
        ServiceType::Stt,
        ServiceType::ImgGen,
        ServiceType::ImgEdit,
    ];

    /// The name JAiRouter uses in configuration and metrics.
    pub fn key(self) -> &'static str {
        match self {
            ServiceType::Chat => "chat",
            ServiceType::Embedding => "embedding",
            ServiceType::Rerank => "rerank",
            ServiceType::Tts => "tts",
            ServiceType::Stt => "stt",
            ServiceType::ImgGen => "imgGen",
            ServiceType::ImgEdit => "imgEdit",
        }
    }

    /// A service key as written in `model.services`, with the aliases the original's
    /// `ServiceTypeResolver` accepts.
    pub fn from_config_key(key: &str) -> Option<ServiceType> {
        let normal: String = key
            .chars()
            .filter(|c| *c != '-' && *c != '_')
            .map(|c| c.to_ascii_lowercase())
            .collect();
        Some(match normal.as_str() {
            "chat" | "chatcompletions" | "completions" => ServiceType::Chat,
            "embedding" | "embeddings" => ServiceType::Embedding,
            "rerank" => ServiceType::Rerank,
            "tts" | "texttospeech" | "speech" => ServiceType::Tts,
            "stt" | "speechtotext" | "transcription" | "transcriptions" => ServiceType::Stt,
            "imggen" | "imagegeneration" | "imagegenerations" => ServiceType::ImgGen,
            "imgedit" | "imageedit" | "imageedits" => ServiceType::ImgEdit,
            _ => return None,
        })
    }

    /// Services whose requests upload files (multipart): not retried unless configured, since a
    /// second attempt sends the whole upload again (and image edits are not free to repeat).
    pub fn takes_uploads(self) -> bool {
        matches!(self, ServiceType::Stt | ServiceType::ImgEdit)
    }

    pub fn index(self) -> usize {
        self as usize
    }

    /// The endpoint whose path an instance's `path` is (the others of the service derive from it).
    pub fn primary_endpoint(self) -> Endpoint {
        match self {
            ServiceType::Chat => Endpoint::ChatCompletions,
            ServiceType::Embedding => Endpoint::Embeddings,
            ServiceType::Rerank => Endpoint::Rerank,
            ServiceType::Tts => Endpoint::Speech,
            ServiceType::Stt => Endpoint::Transcriptions,
            ServiceType::ImgGen => Endpoint::ImageGenerations,
            ServiceType::ImgEdit => Endpoint::ImageEdits,
        }
    }
}

/// One OpenAI endpoint that carries a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
    Rerank,
    Speech,
    Transcriptions,
    Translations,
    ImageGenerations,
    ImageEdits,
    /// Anthropic's Messages API (`/v1/messages`), for Claude Code and the Anthropic SDKs.
    Messages,
    /// `/v1/messages/count_tokens`.
    CountTokens,
    /// OpenAI's Responses API (`/v1/responses`), for Codex CLI and the OpenAI Agents SDK.
    Responses,
}

impl Endpoint {
    pub const ALL: [Endpoint; 12] = [
        Endpoint::ChatCompletions,
        Endpoint::Completions,
        Endpoint::Embeddings,
        Endpoint::Rerank,
        Endpoint::Speech,
        Endpoint::Transcriptions,
        Endpoint::Translations,
        Endpoint::ImageGenerations,
        Endpoint::ImageEdits,
        Endpoint::Messages,
        Endpoint::CountTokens,
        Endpoint::Responses,
    ];

    /// The path below `/v1/`.
    pub fn suffix(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat/completions",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Rerank => "rerank",
            Endpoint::Speech => "audio/speech",
            Endpoint::Transcriptions => "audio/transcriptions",
            Endpoint::Translations => "audio/translations",
            Endpoint::ImageGenerations => "images/generations",
            Endpoint::ImageEdits => "images/edits",
            Endpoint::Messages => "messages",
            Endpoint::CountTokens => "messages/count_tokens",
            Endpoint::Responses => "responses",
        }
    }

    /// Anthropic's endpoints: their errors are in Anthropic's shape.
    pub fn is_anthropic(self) -> bool {
        matches!(self, Endpoint::Messages | Endpoint::CountTokens)
    }

    pub fn service(self) -> ServiceType {
        match self {
            Endpoint::ChatCompletions
            | Endpoint::Completions
            | Endpoint::Messages
            | Endpoint::CountTokens
            | Endpoint::Responses => ServiceType::Chat,
            Endpoint::Embeddings => ServiceType::Embedding,
            Endpoint::Rerank => ServiceType::Rerank,
            Endpoint::Speech => ServiceType::Tts,
            Endpoint::Transcriptions | Endpoint::Translations => ServiceType::Stt,
            Endpoint::ImageGenerations => ServiceType::ImgGen,
            Endpoint::ImageEdits => ServiceType::ImgEdit,
        }
    }

    /// `gen_ai.operation.name` (OpenTelemetry's GenAI conventions): their well-known value where
    /// one applies, else a name of our own. Anthropic's Messages API and OpenAI's Responses API
    /// are chats too: the conventions name the operation (a model's turn in a conversation), not
    /// the wire format, and have no value of their own for either, so a dashboard summing `chat`
    /// sees every conversation turn whichever API the client spoke.
    pub fn gen_ai_operation(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions | Endpoint::Messages | Endpoint::Responses => "chat",
            Endpoint::Completions => "text_completion",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Rerank => "rerank",
            Endpoint::Speech => "text_to_speech",
            Endpoint::Transcriptions => "transcription",
            Endpoint::Translations => "translation",
            Endpoint::ImageGenerations => "image_generation",
            Endpoint::ImageEdits => "image_edit",
            Endpoint::CountTokens => "count_tokens",
        }
    }

    /// The upstream path for this endpoint on an instance whose configured `path` serves the
    /// service's primary endpoint: `/v1/chat/completions` → `/v1/completions`. A `path` that does
    /// not end in the primary suffix gets the standard `/v1/<suffix>` for the other endpoints.
    pub fn upstream_path(self, instance_path: &str) -> String {
        let primary = self.service().primary_endpoint();
        if primary == self {
            return instance_path.to_string();
        }
        match instance_path.strip_suffix(primary.suffix()) {
            Some(prefix) if prefix.ends_with('/') => format!("{prefix}{}", self.suffix()),
            _ => format!("/v1/{}", self.suffix()),
        }
    }
}

/// What a request path asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Model(Endpoint),
    /// `GET /v1/models`
    ListModels,
    /// `GET /v1/models/{id}` (the id is the rest of the path)
    RetrieveModel,
    /// `/v1/responses/{id}` and below it (`input_items`, `cancel`): a stored Response, which
    /// this gateway never keeps (the id is the path's next segment).
    StoredResponse,
    Unknown,
}

/// Classifies `:path` (query string ignored); both `/v1/...` and `/api/v1/...` are served, as
/// in the original.
pub fn classify(path: &str) -> (Route, &str) {
    let path = path.split(['?', '#']).next().unwrap_or_default();
    let rest = path
        .strip_prefix("/api/v1/")
        .or_else(|| path.strip_prefix("/v1/"));
    let Some(rest) = rest else {
        return (Route::Unknown, "");
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest == "models" {
        return (Route::ListModels, "");
    }
    if let Some(id) = rest.strip_prefix("models/") {
        return (Route::RetrieveModel, id);
    }
    if let Some(below) = rest.strip_prefix("responses/") {
        let id = below.split('/').next().unwrap_or_default();
        return (Route::StoredResponse, id);
    }
    for endpoint in Endpoint::ALL {
        if rest == endpoint.suffix() {
            return (Route::Model(endpoint), "");
        }
    }
    (Route::Unknown, "")
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn both_prefixes_and_every_endpoint() {
        for e in Endpoint::ALL {
            let v1 = format!("/v1/{}", e.suffix());
            let api = format!("/api/v1/{}?x=1", e.suffix());
            assert_eq!(classify(&v1).0, Route::Model(e));
            assert_eq!(classify(&api).0, Route::Model(e));
        }
        assert_eq!(classify("/v1/models").0, Route::ListModels);
        assert_eq!(classify("/api/v1/models/").0, Route::ListModels);
        assert_eq!(
            classify("/v1/models/qwen2.5:7b"),
            (Route::RetrieveModel, "qwen2.5:7b")
        );
        for path in [
            "/v1/responses/resp_1",
            "/api/v1/responses/resp_1/input_items?limit=2",
            "/v1/responses/resp_1/cancel",
        ] {
            assert_eq!(classify(path), (Route::StoredResponse, "resp_1"), "{path}");
        }
        assert_eq!(Endpoint::Responses.service(), ServiceType::Chat);
        assert_eq!(Endpoint::Responses.gen_ai_operation(), "chat");
        assert_eq!(classify("/v2/chat/completions").0, Route::Unknown);
        assert_eq!(classify("/v1/chat").0, Route::Unknown);
        assert_eq!(classify("").0, Route::Unknown);
    }

    #[test]
    fn derived_paths() {
        let e = Endpoint::Completions;
        assert_eq!(e.upstream_path("/v1/chat/completions"), "/v1/completions");
        assert_eq!(e.upstream_path("/api/chat/completions"), "/api/completions");
        assert_eq!(e.upstream_path("/api/chat"), "/v1/completions");
        assert_eq!(
            Endpoint::Translations.upstream_path("/v1/audio/transcriptions"),
            "/v1/audio/translations"
        );
        assert_eq!(
            Endpoint::ChatCompletions.upstream_path("/custom"),
            "/custom"
        );
    }

    #[test]
    fn service_aliases() {
        assert_eq!(
            ServiceType::from_config_key("imgGen"),
            Some(ServiceType::ImgGen)
        );
        assert_eq!(
            ServiceType::from_config_key("img-gen"),
            Some(ServiceType::ImgGen)
        );
        assert_eq!(
            ServiceType::from_config_key("image-edit"),
            Some(ServiceType::ImgEdit)
        );
        assert_eq!(
            ServiceType::from_config_key("embeddings"),
            Some(ServiceType::Embedding)
        );
        assert_eq!(
            ServiceType::from_config_key("speech-to-text"),
            Some(ServiceType::Stt)
        );
        assert_eq!(ServiceType::from_config_key("nope"), None);
        for s in ServiceType::ALL {
            assert_eq!(ServiceType::from_config_key(s.key()), Some(s));
        }
    }
}

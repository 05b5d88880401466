// picochat web UI: model output as HTML. Markdown by marked, code highlighting by highlight.js, then
// DOMPurify over the result (all three vendored in static/vendor/). Raw HTML in the model's output is shown
// as text, never as markup; links open in a new tab with rel=noopener, and only for http(s) URLs; images
// become links (never loaded). Exposes window.picochatMarkdown = { escapeHtml, renderMarkdown }.
"use strict";

(() => {
  function escapeHtml(text) {
    const map = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
    return String(text).replace(/[&<>"']/g, (c) => map[c]);
  }

  function codeBlockHtml(code, language) {
    return `<div class="code-block"><div class="code-head"><span>${escapeHtml(language || "code")}</span>` +
      `<button type="button" class="copy-code" data-testid="copy-code" aria-label="Copy code">Copy</button></div>` +
      `<pre><code class="hljs">${code}</code></pre></div>`;
  }

  function safeUrl(href) { // only absolute http(s) links: no javascript:, data:, relative or file URLs
    try {
      const url = new URL(href);
      return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
    } catch {
      return null;
    }
  }

  function linkHtml(href, inner) {
    const url = safeUrl(href);
    if (!url) return inner;
    return `<a href="${escapeHtml(url)}" target="_blank" rel="noopener noreferrer nofollow">${inner}</a>`;
  }

  const markdown = new marked.Marked({ gfm: true, breaks: true });
  markdown.use({
    renderer: {
      html(token) { return escapeHtml(token.text); }, // the model's HTML is text to read, not markup
      link(token) { return linkHtml(token.href, this.parser.parseInline(token.tokens)); },
      image(token) { return linkHtml(token.href, escapeHtml(token.text || token.href)); }, // never load it
      code(token) {
        const language = (token.lang || "").trim().split(/\s+/)[0].toLowerCase();
        const code = language && hljs.getLanguage(language)
          ? hljs.highlight(token.text, { language, ignoreIllegals: true }).value
          : escapeHtml(token.text);
        return codeBlockHtml(code, language);
      },
      heading(token) {
        const inner = this.parser.parseInline(token.tokens);
        if (token.finalAnswer) {
          return `<div class="final-answer" data-testid="final-answer"><span class="final-label">Answer</span>` +
            `<span class="final-value">${inner}</span></div>`;
        }
        const level = Math.min(token.depth + 2, 6); // h3..h6: the page title is the h1
        return `<h${level}>${inner}</h${level}>`;
      },
    },
  });

  // GSM8K-style replies end with "#### <answer>": that last heading is the final answer, not a title.
  function renderMarkdown(source) {
    const tokens = markdown.lexer(source);
    const last = tokens.filter((t) => t.type !== "space").at(-1);
    if (last?.type === "heading" && last.depth === 4) last.finalAnswer = true;
    const html = markdown.parser(tokens).trim();
    return DOMPurify.sanitize(html, { ADD_ATTR: ["target"] });
  }

  window.picochatMarkdown = { escapeHtml, renderMarkdown };
})();

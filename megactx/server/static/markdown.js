// A small Markdown renderer for model answers: the text is HTML-escaped first, so nothing the model writes can
// become markup beyond what is handled here (fenced and inline code, headings, lists, bold, italic, links).
"use strict";

function escapeHtml(s) {
  return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
}

function inlineMarkdown(s) {
  return s
    .replace(/`([^`]+)`/g, "<code>$1</code>")
    .replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^*])\*([^*\s][^*]*)\*/g, "$1<em>$2</em>")
    .replace(/\[([^\]]+)\]\((https?:\/\/[^\s)]+)\)/g, '<a href="$2" rel="noopener" target="_blank">$1</a>');
}

function renderMarkdown(text) {
  const out = [];
  const parts = escapeHtml(text).split(/^```/m);  // even parts: prose; odd parts: code (an open fence too)
  parts.forEach((part, i) => {
    if (i % 2 === 1) {
      const body = part.replace(/^[^\n]*\n?/, "");  // the language tag's line
      out.push(`<pre><code>${body}</code></pre>`);
      return;
    }
    let list = null;
    for (const line of part.split("\n")) {
      const item = line.match(/^\s*(?:[-*]|\d+\.)\s+(.*)$/);
      if (item) {
        if (!list) { list = []; }
        list.push(`<li>${inlineMarkdown(item[1])}</li>`);
        continue;
      }
      if (list) { out.push(`<ul>${list.join("")}</ul>`); list = null; }
      const heading = line.match(/^(#{1,6})\s+(.*)$/);
      if (heading) {
        const level = Math.min(heading[1].length + 2, 6);
        out.push(`<h${level}>${inlineMarkdown(heading[2])}</h${level}>`);
      } else if (line.trim()) {
        out.push(`<p>${inlineMarkdown(line)}</p>`);
      }
    }
    if (list) { out.push(`<ul>${list.join("")}</ul>`); }
  });
  return out.join("");
}

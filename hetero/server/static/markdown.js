// A small markdown renderer for chat replies. Safety first: the whole text is HTML-escaped
// before any markup is added, and link targets must be http(s), mailto or relative.
// Block syntax: ATX headings, fenced code (an unclosed fence renders as code, as in a stream),
// lists (nested by indentation), blockquotes, tables, rules, paragraphs. Inline syntax: code
// spans, links, bold, italic, strikethrough.
"use strict";

(function () {
  const escapeHtml = (s) =>
    s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
      .replace(/"/g, "&quot;").replace(/'/g, "&#39;");

  // `url` is already escaped; browsers ignore control characters and blanks inside a scheme
  function safeHref(url) {
    const bare = url.replace(/&amp;/g, "&").replace(/[\u0000-\u0020\u007f-\u009f]/g, "");
    const scheme = /^([a-z][a-z0-9+.-]*):/i.exec(bare);
    return !scheme || /^(https?|mailto)$/i.test(scheme[1]) ? url : null;
  }

  // `text` is escaped; code spans and links are set aside so emphasis never reaches into them
  function inline(text) {
    const kept = [];
    const keep = (html) => "\u0000" + (kept.push(html) - 1) + "\u0000";
    let s = text.replace(/(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/g,
      (_, ticks, code) => keep("<code>" + code + "</code>"));
    s = s.replace(/\[([^\]\n]+)\]\(\s*([^()\s]+)\s*\)/g, (m, label, url) => {
      const href = safeHref(url);
      if (!href) return m;
      return keep(`<a href="${href}" target="_blank" rel="noopener noreferrer">${emphasis(label)}</a>`);
    });
    s = s.replace(/(^|[\s(])(https?:\/\/(?:[^\s<&]|&amp;)*[^\s<&.,;:!?)])/g, (_, pre, url) =>
      pre + keep(`<a href="${url}" target="_blank" rel="noopener noreferrer">${url}</a>`));
    s = emphasis(s);
    return s.replace(/\u0000(\d+)\u0000/g, (_, i) => kept[+i]);
  }

  function emphasis(s) {
    return s
      .replace(/\*\*(?=\S)([\s\S]*?\S)\*\*/g, "<strong>$1</strong>")
      .replace(/(^|[^\w])__(?=\S)([\s\S]*?\S)__(?!\w)/g, "$1<strong>$2</strong>")
      .replace(/\*([^\s*](?:[^*]*[^\s*])?)\*/g, "<em>$1</em>")
      .replace(/(^|[^\w])_([^\s_](?:[^_]*[^\s_])?)_(?!\w)/g, "$1<em>$2</em>")
      .replace(/~~(?=\S)([\s\S]*?\S)~~/g, "<del>$1</del>");
  }

  const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)/;
  const HEADING = /^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$/;
  const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;
  const ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
  const QUOTE = /^ {0,3}&gt;\s?(.*)$/;
  const TABLE_SEP = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;
  const indentOf = (line) => line.match(/^\s*/)[0].replace(/\t/g, "    ").length;
  const cells = (row) => row.trim().replace(/^\||\|$/g, "").split("|").map((c) => c.trim());
  const startsBlock = (line, next) =>
    FENCE.test(line) || HEADING.test(line) || RULE.test(line) || ITEM.test(line) ||
    QUOTE.test(line) || (line.includes("|") && next !== undefined && TABLE_SEP.test(next));

  function codeBlock(lang, lines) {
    const cls = lang ? ` class="language-${lang.replace(/[^\w+#.-]/g, "")}"` : "";
    return '<div class="code-block"><div class="code-head"><span class="code-lang">' +
      (lang || "code") + '</span><button type="button" class="copy-code" ' +
      'aria-label="Copy code">Copy</button></div>' +
      `<pre><code${cls}>${lines.join("\n")}</code></pre></div>`;
  }

  // `lines` are escaped; returns the HTML of the blocks they make
  function blocks(lines) {
    const out = [];
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      let m;
      if (!line.trim()) { i++; continue; }
      if ((m = FENCE.exec(line))) {
        const close = new RegExp("^ {0,3}" + m[1][0] + "{" + m[1].length + ",}\\s*$");
        const body = [];
        for (i++; i < lines.length && !close.test(lines[i]); i++) body.push(lines[i]);
        i++;
        out.push(codeBlock(m[2], body));
      } else if ((m = HEADING.exec(line))) {
        const n = m[1].length;
        out.push(`<h${n}>${inline(m[2])}</h${n}>`);
        i++;
      } else if (RULE.test(line)) {
        out.push("<hr>");
        i++;
      } else if (QUOTE.test(line)) {
        const body = [];
        for (; i < lines.length && (m = QUOTE.exec(lines[i])); i++) body.push(m[1]);
        out.push(`<blockquote>${blocks(body)}</blockquote>`);
      } else if (line.includes("|") && i + 1 < lines.length && TABLE_SEP.test(lines[i + 1])) {
        const head = cells(line).map((c) => `<th>${inline(c)}</th>`).join("");
        const rows = [];
        for (i += 2; i < lines.length && lines[i].includes("|") && lines[i].trim(); i++) {
          rows.push("<tr>" + cells(lines[i]).map((c) => `<td>${inline(c)}</td>`).join("") + "</tr>");
        }
        out.push(`<div class="table-wrap"><table><thead><tr>${head}</tr></thead>` +
          `<tbody>${rows.join("")}</tbody></table></div>`);
      } else if ((m = ITEM.exec(line))) {
        i = list(lines, i, out);
      } else {
        const para = [];
        for (; i < lines.length && lines[i].trim(); i++) {
          if (para.length && startsBlock(lines[i], lines[i + 1])) break;
          para.push(lines[i].trim());
        }
        out.push(`<p>${para.map(inline).join("<br>")}</p>`);
      }
    }
    return out.join("\n");
  }

  // strips up to n columns of leading blanks (a tab counts 4)
  function dedent(line, n) {
    let i = 0;
    for (let col = 0; i < line.length && col < n && /[ \t]/.test(line[i]); i++) {
      col += line[i] === "\t" ? 4 : 1;
    }
    return line.slice(i);
  }

  // a list starting at lines[start]; lines indented past its markers belong to the item above
  // (nested lists included), and a blank line ends it unless the list goes on after it
  function list(lines, start, out) {
    const first = ITEM.exec(lines[start]);
    const base = indentOf(lines[start]);
    const ordered = /\d/.test(first[2]);
    const items = [];
    let i = start;
    let inner = 0;
    for (; i < lines.length; i++) {
      const line = lines[i];
      const m = ITEM.exec(line);
      if (!line.trim()) {
        const next = lines[i + 1];
        if (next === undefined || !next.trim()) break;
        const same = ITEM.exec(next);
        if (indentOf(next) <= base && !(same && /\d/.test(same[2]) === ordered)) break;
        items[items.length - 1].push("");
      } else if (m && indentOf(line) <= base + 1) {
        if (/\d/.test(m[2]) !== ordered) break;
        items.push([m[3]]);
        inner = indentOf(line) + m[2].length + 1;
      } else if (indentOf(line) > base) {
        items[items.length - 1].push(dedent(line, inner));
      } else if (!startsBlock(line, lines[i + 1]) && items[items.length - 1].at(-1) !== "") {
        items[items.length - 1].push(line.trim());
      } else {
        break;
      }
    }
    const lis = items.map(([head, ...rest]) => {
      const tight = rest.every((l, k) => l.trim() && !startsBlock(l, rest[k + 1]));
      const more = tight ? rest.map((l) => "<br>" + inline(l.trim())).join("") : blocks(rest);
      return `<li>${inline(head.trim())}${more}</li>`;
    });
    const n = parseInt(first[2], 10);
    const tag = ordered ? (n !== 1 ? `ol start="${n}"` : "ol") : "ul";
    out.push(`<${tag}>${lis.join("")}</${tag.slice(0, 2)}>`);
    return i;
  }

  window.renderMarkdown = function (text) {
    const safe = escapeHtml(String(text).replace(/\u0000/g, "").replace(/\r\n?/g, "\n"));
    return blocks(safe.split("\n"));
  };
  window.escapeHtml = escapeHtml;
})();

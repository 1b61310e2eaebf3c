// Markdown to DOM, for model replies: fenced code, headings, lists, quotes, rules, tables,
// paragraphs; inline code, bold, italic, strike-through and links (http, https and mailto
// only). Built with createElement and text nodes, never parsed as HTML: whatever a model
// writes (<script>, <img onerror>, javascript: links) shows as text. Tolerates the half
// written reply of a stream (an open code fence is a code block until it closes).

const SAFE_LINK = /^(https?:\/\/|mailto:)/i;

function node(tag, className) {
  const n = document.createElement(tag);
  if (className) n.className = className;
  return n;
}

// the earliest inline construct in text from position start
const INLINE = [
  { kind: "code", re: /(`+)([\s\S]*?[^`])\1(?!`)/y },
  { kind: "link", re: /\[([^\]\n]+)\]\(([^)\s]+)(?:\s+"[^"]*")?\)/y },
  { kind: "strong", re: /\*\*(?=\S)([\s\S]*?\S)\*\*/y },
  { kind: "strong", re: /__(?=\S)([\s\S]*?\S)__(?![A-Za-z0-9])/y },
  { kind: "del", re: /~~(?=\S)([\s\S]*?\S)~~/y },
  { kind: "em", re: /\*(?=[^\s*])([\s\S]*?[^\s*])\*(?!\*)/y },
  { kind: "em", re: /(?<![A-Za-z0-9])_(?=[^\s_])([\s\S]*?[^\s_])_(?![A-Za-z0-9])/y },
  { kind: "url", re: /https?:\/\/[^\s<>()]+[^\s<>().,;:!?'"]/y },
];
const STARTS = /[`[*_~h]/g;

export function inline(text, parent, depth = 0) {
  let plain = "";
  let i = 0;
  const flush = () => {
    if (plain) parent.append(document.createTextNode(plain));
    plain = "";
  };
  while (i < text.length) {
    STARTS.lastIndex = i;
    const found = STARTS.exec(text);
    if (!found) break;
    plain += text.slice(i, found.index);
    i = found.index;
    let matched = false;
    for (const { kind, re } of INLINE) {
      re.lastIndex = i;
      const m = re.exec(text);
      if (!m) continue;
      if (kind === "url" && i > 0 && /[A-Za-z0-9]/.test(text[i - 1])) continue;
      flush();
      if (kind === "code") {
        const code = node("code");
        code.textContent = m[2].replace(/^ (.*) $/s, "$1");
        parent.append(code);
      } else if (kind === "link" || kind === "url") {
        const href = kind === "link" ? m[2] : m[0];
        const label = kind === "link" ? m[1] : m[0];
        if (SAFE_LINK.test(href)) {
          const a = node("a");
          a.href = href;
          a.rel = "noopener noreferrer";
          a.target = "_blank";
          if (depth < 4 && kind === "link") inline(label, a, depth + 1);
          else a.textContent = label;
          parent.append(a);
        } else {
          parent.append(document.createTextNode(m[0]));
        }
      } else {
        const n = node(kind);
        if (depth < 4) inline(m[1], n, depth + 1);
        else n.textContent = m[1];
        parent.append(n);
      }
      i += m[0].length;
      matched = true;
      break;
    }
    if (!matched) {
      plain += text[i];
      i += 1;
    }
  }
  plain += text.slice(i);
  flush();
  return parent;
}

// inline text whose single newlines are line breaks
function lines(text, parent) {
  text.split("\n").forEach((line, k) => {
    if (k) parent.append(node("br"));
    inline(line, parent);
  });
  return parent;
}

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)[^`]*$/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;
const BULLET = /^(\s*)([-*+])\s+(.*)$/;
const NUMBER = /^(\s*)(\d{1,9})[.)]\s+(.*)$/;
const QUOTE = /^ {0,3}>\s?(.*)$/;
const TABLE_RULE = /^\s*\|?\s*:?-{2,}:?\s*(\|\s*:?-{2,}:?\s*)*\|?\s*$/;

function cells(line) {
  let text = line.trim();
  if (text.startsWith("|")) text = text.slice(1);
  if (text.endsWith("|") && !text.endsWith("\\|")) text = text.slice(0, -1);
  return text.split(/(?<!\\)\|/).map((c) => c.trim().replace(/\\\|/g, "|"));
}

export function render(source) {
  const root = document.createDocumentFragment();
  const all = String(source).replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  let paragraph = [];
  const endParagraph = () => {
    if (paragraph.length) root.append(lines(paragraph.join("\n"), node("p")));
    paragraph = [];
  };
  while (i < all.length) {
    const line = all[i];
    let m;
    if ((m = line.match(FENCE))) {
      endParagraph();
      const fence = m[1];
      const lang = m[2];
      const body = [];
      i += 1;
      while (i < all.length && !(all[i].trim().startsWith(fence) && /^[`~]+$/.test(all[i].trim()))) {
        body.push(all[i]);
        i += 1;
      }
      i += 1; // the closing fence (or the end of a reply still streaming)
      const pre = node("pre", "code");
      const code = node("code");
      code.textContent = body.join("\n");
      if (lang) {
        code.dataset.lang = lang;
        const label = node("span", "lang");
        label.textContent = lang;
        pre.append(label);
      }
      pre.append(code);
      root.append(pre);
      continue;
    }
    if (!line.trim()) {
      endParagraph();
      i += 1;
      continue;
    }
    if ((m = line.match(HEADING))) {
      endParagraph();
      root.append(inline(m[2], node(`h${Math.min(m[1].length + 2, 6)}`)));
      i += 1;
      continue;
    }
    if (RULE.test(line) && !paragraph.length) {
      root.append(node("hr"));
      i += 1;
      continue;
    }
    if (line.includes("|") && i + 1 < all.length && TABLE_RULE.test(all[i + 1])) {
      endParagraph();
      const table = node("table");
      const head = node("tr");
      for (const c of cells(line)) head.append(inline(c, node("th")));
      table.append(node("thead"));
      table.firstChild.append(head);
      const body = node("tbody");
      i += 2;
      while (i < all.length && all[i].includes("|") && all[i].trim()) {
        const row = node("tr");
        for (const c of cells(all[i])) row.append(inline(c, node("td")));
        body.append(row);
        i += 1;
      }
      table.append(body);
      const wrap = node("div", "table-wrap");
      wrap.append(table);
      root.append(wrap);
      continue;
    }
    if ((m = line.match(QUOTE))) {
      endParagraph();
      const quoted = [];
      while (i < all.length && (m = all[i].match(QUOTE))) {
        quoted.push(m[1]);
        i += 1;
      }
      const quote = node("blockquote");
      quote.append(render(quoted.join("\n")));
      root.append(quote);
      continue;
    }
    if (BULLET.test(line) || NUMBER.test(line)) {
      endParagraph();
      const ordered = !BULLET.test(line);
      const list = node(ordered ? "ol" : "ul");
      if (ordered) {
        const first = Number(line.match(NUMBER)[2]);
        if (first !== 1) list.start = first;
      }
      const pattern = ordered ? NUMBER : BULLET;
      const indent = line.match(pattern)[1].length;
      while (i < all.length) {
        m = all[i].match(pattern);
        if (!m || m[1].length < indent) break;
        const item = [m[3]];
        i += 1;
        // continuation and nested lines: indented deeper than the marker
        while (i < all.length && all[i].trim() && /^\s+/.test(all[i]) && !(all[i].match(pattern) && all[i].match(pattern)[1].length === indent)) {
          item.push(all[i].slice(Math.min(indent + 2, all[i].search(/\S/))));
          i += 1;
        }
        const li = node("li");
        if (item.length === 1) inline(item[0], li);
        else li.append(render(item.join("\n")));
        list.append(li);
        if (i < all.length && !all[i].trim() && i + 1 < all.length && all[i + 1].match(pattern)) i += 1;
      }
      root.append(list);
      continue;
    }
    paragraph.push(line);
    i += 1;
  }
  endParagraph();
  return root;
}

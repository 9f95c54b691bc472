// Typesets the math of every page with the vendored KaTeX (javascripts/katex/, see
// javascripts/README.md): nothing is loaded from the network.
//
// pymdownx.arithmatex (generic mode) writes inline math as
// <span class="arithmatex">\(...\)</span> and display math as
// <div class="arithmatex">\[...\]</div>; each such element is rendered in place.
function renderArithmatex(root) {
  for (const el of root.querySelectorAll(".arithmatex")) {
    const text = el.textContent.trim();
    const display = text.startsWith("\\[");
    const inline = text.startsWith("\\(");
    if (!display && !inline) continue; // already rendered
    katex.render(text.slice(2, -2), el, { displayMode: display, throwOnError: false });
  }
}

if (typeof document$ !== "undefined") {
  // Material for MkDocs: runs on the first load and after every instant navigation.
  document$.subscribe(({ body }) => renderArithmatex(body));
} else {
  document.addEventListener("DOMContentLoaded", () => renderArithmatex(document.body));
}

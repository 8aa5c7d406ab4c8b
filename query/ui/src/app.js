// Lumen's web UI: a hash-routed one-page app over the query port's APIs.
// Each page is a function (root, argument, context) that draws into root
// and returns what stops its timers when the user leaves.

import { h, errorBox } from "./util.js";
import { graphPage } from "./graph.js";
import { servicesPage } from "./services.js";
import { servicePage } from "./service.js";
import { tailPage } from "./tail.js";
import { tracePage } from "./trace.js";
import { consolePage } from "./console.js";
import { policyPage } from "./policy.js";

const PAGES = {
  graph: { title: "Service graph", draw: graphPage, nav: true },
  services: { title: "Services", draw: servicesPage, nav: true },
  service: { title: "Service", draw: servicePage },
  tail: { title: "Live tail", draw: tailPage, nav: true },
  trace: { title: "Trace", draw: tracePage },
  sql: { title: "SQL", draw: consolePage, nav: true },
  policy: { title: "Policy", draw: policyPage, nav: true },
};

const RANGES = [
  ["5m", 300],
  ["15m", 900],
  ["1h", 3600],
  ["6h", 21600],
  ["24h", 86400],
];

const context = {
  range: Number(localStorage.getItem("lumen.range")) || 900,
};

let stop = null;

function route() {
  const [, name = "graph", ...rest] = (location.hash || "#/graph").split("/");
  const page = PAGES[name] ? name : "graph";
  let arg = "";
  try {
    arg = rest.map(decodeURIComponent).join("/");
  } catch {
    arg = rest.join("/"); // a malformed escape: the text as it is
  }
  for (const a of document.querySelectorAll("#nav a")) {
    a.classList.toggle("active", a.dataset.page === page || (page === "service" && a.dataset.page === "services"));
  }
  if (stop) {
    try {
      stop();
    } catch {
      /* a page's cleanup must not block the next page */
    }
  }
  const main = document.getElementById("main");
  main.replaceChildren();
  document.title = `${PAGES[page].title}${arg ? ` · ${arg}` : ""} · Lumen`;
  try {
    stop = PAGES[page].draw(main, arg, context) || null;
  } catch (e) {
    main.replaceChildren(errorBox(e));
    stop = null;
  }
}

function header() {
  const nav = document.getElementById("nav");
  nav.replaceChildren(
    ...Object.entries(PAGES)
      .filter(([, p]) => p.nav)
      .map(([name, p]) => h("a", { href: `#/${name}`, "data-page": name }, p.title)),
  );
  const select = document.getElementById("range");
  select.replaceChildren(
    ...RANGES.map(([label, s]) => h("option", { value: s, selected: s === context.range }, `Last ${label}`)),
  );
  select.addEventListener("change", () => {
    context.range = Number(select.value);
    localStorage.setItem("lumen.range", String(context.range));
    route();
  });
}

header();
window.addEventListener("hashchange", route);
route();

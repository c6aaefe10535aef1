// Small progressive enhancements; every page works without them.
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  // "Select all" check box for the message list.
  document.querySelectorAll("input[data-select-all]").forEach(function (all) {
    all.addEventListener("change", function () {
      document.querySelectorAll("input[name='ids']").forEach(function (box) { box.checked = all.checked; });
    });
  });
  // Live feedback on the password rules, next to the field.
  document.querySelectorAll("input[data-password-rules]").forEach(function (field) {
    var list = document.getElementById(field.getAttribute("data-password-rules"));
    if (!list) { return; }
    var tests = {
      length: function (v) { return v.length >= 8; },
      lower: function (v) { return v !== v.toUpperCase(); },
      upper: function (v) { return v !== v.toLowerCase(); },
      digit: function (v) { return /[0-9]/.test(v); }
    };
    var update = function () {
      list.querySelectorAll("li[data-rule]").forEach(function (item) {
        var test = tests[item.getAttribute("data-rule")];
        item.classList.toggle("met", !!test && test(field.value));
      });
    };
    field.addEventListener("input", update);
    update();
  });
  // Confirmation for destructive buttons.
  document.querySelectorAll("button[data-confirm]").forEach(function (button) {
    button.addEventListener("click", function (event) {
      if (!window.confirm(button.getAttribute("data-confirm"))) { event.preventDefault(); }
    });
  });
});
